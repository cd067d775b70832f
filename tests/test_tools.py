"""Issue 16: tool calls on the real base, through a real ``solverx serve``, the official openai SDK and LangChain's
``bind_tools``. SmolLM2's template knows no tools, so the tools go in the documented Hermes-style system block
(``server/tools.py``) and the grammar makes every call valid JSON for its tool's schema."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import openai
import pytest

from solverx.models.builtin import SMOLLM_BASE_ID

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 40}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def daemon(real_daemon):
    return real_daemon


@pytest.fixture(scope="module")
def client(daemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.api_url, api_key="x", max_retries=0, timeout=300)


def create(client: openai.OpenAI, **kwargs):
    kwargs.setdefault("messages", QUESTION)
    kwargs.setdefault("max_tokens", 80)
    return client.chat.completions.create(model=SMOLLM_BASE_ID, temperature=0, **kwargs)


def test_required_named_and_none_each_answer_as_asked_in_one_batch(client) -> None:
    import jsonschema

    named_choice = {"type": "function", "function": {"name": "get_time"}}
    with ThreadPoolExecutor(3) as pool:  # at once: one engine batch, three different grammars (one none)
        required = pool.submit(create, client, tools=[WEATHER, TIME], tool_choice="required")
        named = pool.submit(create, client, tools=[WEATHER, TIME], tool_choice=named_choice)
        plain = pool.submit(create, client, tools=[WEATHER], tool_choice="none", max_tokens=24)
    choice = required.result().choices[0]
    assert choice.finish_reason == "tool_calls", choice
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)

    calls = named.result().choices[0].message.tool_calls
    assert [c.function.name for c in calls] and {c.function.name for c in calls} == {"get_time"}

    message, finish = plain.result().choices[0].message, plain.result().choices[0].finish_reason
    assert message.tool_calls is None and finish in ("stop", "length")
    assert message.content and "<tool_call>" not in message.content


def test_a_streamed_call_arrives_as_openai_streams_it(client) -> None:
    stream = create(client, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, stream=True)
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1, deltas  # one call: parallel_tool_calls false
    call = deltas[0].tool_calls[0]
    assert call.index == 0 and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["unit"] in ("celsius", "fahrenheit")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_the_call_and_its_result_go_back_into_the_history(client) -> None:
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    answer = create(client, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=40)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.choices[0].message.content


def test_langchain_bind_tools_gets_a_parsed_call_and_structured_output_a_model(daemon) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    llm = ChatOpenAI(model=SMOLLM_BASE_ID, base_url=daemon.api_url, api_key="x", temperature=0, max_tokens=60)
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather", message
    assert isinstance(message.tool_calls[0]["args"]["city"], str)

    class Landmark(BaseModel):
        city: str = Field(max_length=30)
        country: Literal["France", "Italy", "Japan"]

    found = llm.with_structured_output(Landmark, method="json_schema").invoke("Where is the Eiffel Tower?")
    assert isinstance(found, Landmark) and found.country == "France", found


def test_bad_tools_are_a_400_naming_the_field(client) -> None:
    cases = [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            create(client, **extra)
        assert caught.value.body["param"] == param, caught.value.body
