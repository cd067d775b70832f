"""Request validation and response shapes, without a model: what a client sends is checked field by field,
what we send conforms to OpenAI's published schemas, and every error leaves in OpenAI's error schema."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from solverx.adapters.errors import AdapterConflict, InvalidAdapter
from solverx.server import schemas
from solverx.server.app import ServerState, create_app
from solverx.server.errors import InvalidRequest, to_api_error
from solverx.server.models import AdapterMatch, ModelCard, ModelCatalog

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def chat(**fields):
    return schemas.parse_chat_request({**CHAT, **fields})


def refused(parse, body) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse(body)
    return caught.value


# -- requests --------------------------------------------------------------------------------------------


def test_chat_request_defaults_and_extra_fields_are_ignored():
    extra = {"user": "u1", "metadata": {"a": "b"}, "store": False, "presence_penalty": 0, "tool_choice": "none"}
    req = schemas.parse_chat_request({**CHAT, **extra})
    assert req.model == "m"
    assert req.messages == (schemas.ChatMessage("user", "hi"),)
    assert req.options == schemas.GenerationOptions()
    params = req.options.sampling(default_max_tokens=77)
    assert (params.temperature, params.top_p, params.max_tokens, params.stop, params.seed) == (1.0, 1.0, 77, (), None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("prediction", {"type": "content", "content": "x"}),
        ("n", 2),
    ],
)
def test_a_field_that_would_change_the_answer_is_refused_by_name(field, value):
    error = refused(schemas.parse_chat_request, {**CHAT, field: value})
    assert (error.status, error.param) == (400, field), error.message
    assert field in error.message


def test_tool_turns_are_written_into_the_history_the_hermes_way():
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    req = chat(
        messages=[
            *CHAT["messages"],
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ]
    )
    rendered = req.template_messages()
    written = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert rendered[1] == {"role": "assistant", "content": written}
    assert rendered[2] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    bad = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}
    error = refused(schemas.parse_chat_request, {**CHAT, "messages": [*CHAT["messages"], bad]})
    assert (error.status, error.param) == (400, "messages[1].tool_calls")


@pytest.mark.parametrize(("field", "value"), [("logprobs", 2), ("suffix", "x"), ("echo", True)])
def test_completions_refuse_them_too(field, value):
    error = refused(schemas.parse_completion_request, {"model": "m", "prompt": "hi", field: value})
    assert error.param == field


def test_penalties_and_logit_bias_reach_the_sampler():
    req = chat(presence_penalty=0.5, frequency_penalty=-1, logit_bias={"7": -100, "50256": 2.5})
    params = req.options.sampling(default_max_tokens=10)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.0)
    assert params.logit_bias == ((7, -100.0), (50256, 2.5))
    completion = schemas.parse_completion_request({"model": "m", "prompt": "hi", "logit_bias": {"3": 1}})
    assert completion.options.logit_bias == ((3, 1.0),)


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("presence_penalty", 2.5, "decimal_above_max_value"),
        ("frequency_penalty", -3, "decimal_below_min_value"),
        ("logit_bias", [1, 2], "invalid_type"),
        ("logit_bias", {"hello": 1}, "invalid_value"),
        ("logit_bias", {"-1": 1}, "invalid_value"),
        ("logit_bias", {"5": 101}, "decimal_above_max_value"),
        ("logit_bias", {"5": None}, "invalid_type"),
        ("logit_bias", {"5": "1"}, "invalid_type"),
        ("logit_bias", {str(i): 1 for i in range(1025)}, "invalid_value"),
    ],
)
def test_bad_penalties_and_logit_bias_are_refused_by_name(field, value, code):
    error = refused(schemas.parse_chat_request, {**CHAT, field: value})
    assert (error.status, error.param, error.code) == (400, field, code), error.message


def test_chat_request_reads_every_supported_field():
    req = chat(
        temperature=0,
        top_p=0.5,
        max_tokens=9,
        max_completion_tokens=12,
        n=1,
        stop=["a", "", "b"],
        seed=-1,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert req.options == schemas.GenerationOptions(
        temperature=0.0, top_p=0.5, max_tokens=12, stop=("a", "b"), seed=2**64 - 1, stream=True, include_usage=True
    )
    assert chat(stop="END", max_tokens=3.0, temperature=None).options.stop == ("END",)


def test_message_content_parts_and_roles():
    req = chat(
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "q", "name": "ann"},
            {"role": "assistant", "content": None, "tool_calls": []},
        ]
    )
    assert req.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"model": None}, "model", "missing_required_parameter"),
        ({"model": 3}, "model", "invalid_type"),
        ({"messages": None}, "messages", "missing_required_parameter"),
        ({"messages": []}, "messages", "empty_array"),
        ({"messages": "hi"}, "messages", "invalid_type"),
        ({"messages": ["hi"]}, "messages[0]", "invalid_type"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "missing_required_parameter"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "invalid_value"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "missing_required_parameter"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "invalid_type"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
            "unsupported_value",
        ),
        ({"temperature": 2.5}, "temperature", "decimal_above_max_value"),
        ({"temperature": -0.1}, "temperature", "decimal_below_min_value"),
        ({"temperature": "hot"}, "temperature", "invalid_type"),
        ({"temperature": True}, "temperature", "invalid_type"),
        ({"temperature": float("nan")}, "temperature", "invalid_value"),
        ({"top_p": 0}, "top_p", "decimal_below_min_value"),
        ({"top_p": 1.5}, "top_p", "decimal_above_max_value"),
        ({"max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({"max_tokens": 2.5}, "max_tokens", "invalid_type"),
        ({"max_completion_tokens": -1}, "max_completion_tokens", "integer_below_min_value"),
        ({"n": 2}, "n", "unsupported_value"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "array_above_max_length"),
        ({"stop": [1]}, "stop", "invalid_type"),
        ({"seed": "7"}, "seed", "invalid_type"),
        ({"seed": 2**64}, "seed", "integer_above_max_value"),
        ({"stream": "yes"}, "stream", "invalid_type"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage", "invalid_type"),
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
    ],
)
def test_chat_request_errors_name_the_field(fields, param, code):
    error = refused(schemas.parse_chat_request, {**CHAT, **fields})
    assert (error.status, error.type, error.param, error.code) == (400, "invalid_request_error", param, code)


def test_body_must_be_an_object():
    error = refused(schemas.parse_chat_request, [CHAT])
    assert (error.param, error.code) == (None, "invalid_type")


def test_default_model_fills_a_missing_model():
    assert schemas.parse_chat_request({"messages": CHAT["messages"]}, default_model="base").model == "base"


def test_completion_request_prompt_forms():
    assert schemas.parse_completion_request({"model": "m", "prompt": "x"}).prompt == "x"
    assert schemas.parse_completion_request({"model": "m", "prompt": ["y"], "best_of": 1}).prompt == "y"
    for prompt, code in [
        (["a", "b"], "unsupported_value"),
        ([1, 2], "unsupported_value"),
        ([None], "invalid_type"),
        ("", "invalid_value"),
    ]:
        error = refused(schemas.parse_completion_request, {"model": "m", "prompt": prompt})
        assert (error.param, error.code) == ("prompt", code)
    error = refused(schemas.parse_completion_request, {"model": "m", "prompt": "x", "echo": True})
    assert error.param == "echo"


# -- responses against OpenAI's schemas --------------------------------------------------------------------


def test_response_builders_conform(openapi):
    meta = schemas.ResponseMeta.new("chatcmpl", "m")
    assert meta.id.startswith("chatcmpl-")
    counts = schemas.usage(3, 4)
    assert counts["total_tokens"] == 7
    openapi("CreateChatCompletionResponse", schemas.chat_completion(meta, "hi", "stop", counts))
    for with_usage in (False, True):
        openapi("CreateChatCompletionStreamResponse", schemas.chat_chunk(meta, {"role": "assistant"}, None, with_usage))
        openapi("CreateChatCompletionStreamResponse", schemas.chat_chunk(meta, {}, "length", with_usage))
    openapi("CreateChatCompletionStreamResponse", schemas.usage_chunk(meta, "chat.completion.chunk", counts))
    text = schemas.ResponseMeta.new("cmpl", "m")
    openapi("CreateCompletionResponse", schemas.text_completion(text, "x", "length", counts))
    openapi("CreateCompletionResponse", schemas.usage_chunk(text, "text_completion", counts))
    card = ModelCard(id="a@2", created=1, parent="base", root="a@2").to_dict()
    openapi("ListModelsResponse", {"object": "list", "data": [ModelCard(id="base", created=1).to_dict(), card]})


def test_the_schema_check_rejects_a_wrong_body(openapi):
    import jsonschema

    with pytest.raises(jsonschema.ValidationError):
        openapi("CreateChatCompletionResponse", {"id": "x", "object": "chat.completion", "created": 1, "model": "m"})


# -- errors ------------------------------------------------------------------------------------------------


def test_domain_errors_map_by_code(openapi):
    conflict = to_api_error(AdapterConflict("version 3 is promoted"))
    assert (conflict.status, conflict.code) == (409, "adapter_conflict")
    invalid = to_api_error(InvalidAdapter("lora_a has the wrong shape"))
    assert (invalid.status, invalid.code, invalid.param) == (400, "invalid_adapter", "model")
    hidden = to_api_error(KeyError("secret path /home/x"))
    assert hidden.status == 500 and "secret" not in hidden.message
    for error in (conflict, invalid, hidden):
        openapi("ErrorResponse", error.body())


class _BrokenRegistry:
    """An adapter source with a bug: the server must answer 500 in OpenAI's schema and keep the details."""

    def lookup(self, model: str) -> AdapterMatch | None:
        raise RuntimeError("registry index corrupt at /private/path")

    def cards(self):
        return []


def test_unexpected_exception_is_a_500_without_details(openapi):
    app = create_app(ServerState(ModelCatalog({}, adapters=_BrokenRegistry())))
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/chat/completions", json={**CHAT, "model": "someadapter"})
        assert response.status_code == 500
        body = response.json()
        openapi("ErrorResponse", body)
        assert body["error"]["type"] == "server_error" and body["error"]["code"] == "internal_error"
        assert "private" not in response.text and "Traceback" not in response.text

        listed = client.get("/v1/models").json()
        openapi("ListModelsResponse", listed)
        assert listed["data"] == []


def test_api_key_guards_every_route_but_the_dashboard_shell(openapi):
    app = create_app(ServerState(ModelCatalog({}), api_key="s3cret"))
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = client.get("/v1/models", headers=headers)
            assert refused.status_code == 401
            openapi("ErrorResponse", refused.json())
            assert refused.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 401
        assert client.get("/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/").status_code == 200  # the page shell: no data, it asks for the key


def test_response_format_becomes_a_grammar_or_a_400_naming_it():
    text = schemas.parse_chat_request({**CHAT, "response_format": {"type": "text"}})
    assert text.options.grammar is None
    for fmt in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}):
        assert schemas.parse_chat_request({**CHAT, "response_format": fmt}).options.sampling(8).grammar
    error = refused(schemas.parse_chat_request, {**CHAT, "response_format": {"type": "json_schema"}})
    assert (error.status, error.param) == (400, "response_format.json_schema"), error.message
