"""The OpenAI request and response bodies this server speaks, checked by hand into typed dataclasses.

Requests: every field we act on is validated with an error that names it (``param``) the way OpenAI does. A field
that would change the answer and that we cannot honour (``n`` > 1, ``logprobs``, audio…:
:data:`UNHONOURED`) is refused with a 400 naming it unless it holds its neutral value;
fields that do not change the answer (``user``, ``metadata``, ``store``…) are accepted and ignored, as OpenAI's
documentation allows. ``null`` means "not given" throughout.

Responses: plain dicts shaped like ``chat.completion``, ``chat.completion.chunk`` and ``text_completion``;
``tests/test_openai_api.py`` checks them against the OpenAPI spec.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from solverx.engine.grammar import ANY_JSON_OBJECT, InvalidGrammar, json_schema_grammar, tool_call_grammar
from solverx.engine.sampling import SamplingParams
from solverx.server.errors import InvalidRequest
from solverx.server.tools import (
    NO_TOOLS,
    Tool,
    ToolChoice,
    native_message,
    parse_message_calls,
    parse_tools,
    render_history,
)

__all__ = [
    "ROLES",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "GenerationOptions",
    "ResponseMeta",
    "chat_chunk",
    "chat_completion",
    "parse_chat_request",
    "parse_completion_request",
    "text_completion",
    "usage",
    "usage_chunk",
]

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_SEQUENCES = 4
_SEED_RANGE = (-(2**63), 2**64 - 1)


# -- requests ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    tool_calls: tuple[dict[str, Any], ...] = ()  # an assistant's calls: {"id", "name", "arguments"} (parsed JSON)
    tool_call_id: str | None = None  # a tool result's call

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template expects it; ``developer`` is OpenAI's newer name for ``system``."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        return message | ({"tool_calls": self.tool_calls} if self.tool_calls else {})


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling and streaming settings shared by chat and text completions."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None  # response_format json_object / json_schema, compiled (solverx.engine.grammar)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """Engine settings; ``default_max_tokens`` applies when the request set no limit."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens or default_max_tokens,
            stop=self.stop,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=self.logit_bias,
            grammar=self.grammar,
        )


@dataclass(frozen=True)
class ChatCompletionRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    options: GenerationOptions
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = NO_TOOLS
    grounding: bool | None = None  # our extension: use the adapter version's fact graph (None: as its recipe says)

    def template_messages(self, native_tools: bool = False) -> list[dict[str, Any]]:
        """The messages for the chat template: calls and results in OpenAI's shape for a template that renders
        tools itself (``native_tools``), else written into the messages in the Hermes format."""
        messages = [m.for_template() for m in self.messages]
        if native_tools:
            return [native_message(m) for m in messages]
        if self.tools or any(m.role == "tool" or m.tool_calls for m in self.messages):
            return render_history(messages, self.tools)
        return messages

    def encode(self, engine: Any, messages: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt's token ids on ``engine``'s base, tools rendered the way its template can; ``messages``
        replaces :meth:`template_messages` (the grounded ones)."""
        native = engine.chat_rules.native_tools
        tools = [t.signature() for t in self.tools] if native and self.tools else None
        return engine.encode_chat(messages if messages is not None else self.template_messages(native), tools=tools)


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str
    options: GenerationOptions


# Fields that change the answer, with the values that leave it unchanged (None: any false value, e.g. logprobs
# false or 0): anything else is refused by name.
UNHONOURED: dict[str, tuple[Any, ...] | None] = {
    "logprobs": None,
    "top_logprobs": None,
    "echo": None,
    "suffix": None,
    "functions": ([],),
    "function_call": ("none",),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
    "grounding": None,  # our extension, honoured on chats only: a text completion has no question to ground
}


CHAT_UNHONOURED = tuple(name for name in UNHONOURED if name not in ("echo", "suffix", "grounding"))
COMPLETION_UNHONOURED = ("logprobs", "echo", "suffix", "grounding")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
MAX_LOGIT_BIAS_ENTRIES = 1024
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's bounds for presence_penalty and frequency_penalty
LOGIT_BIAS_RANGE = (-100.0, 100.0)


def _refuse_unhonoured(fields: dict[str, Any], names: tuple[str, ...]) -> None:
    for name in names:
        value, neutral = fields.get(name), UNHONOURED[name]
        if value is not None and (value if neutral is None else value not in neutral):
            raise InvalidRequest(
                f"'{name}' is not supported by this server (it would change the answer, and it cannot be honoured "
                "here); leave it out.",
                param=name,
                code="unsupported_parameter",
            )


def parse_chat_request(body: Any, default_model: str | None = None) -> ChatCompletionRequest:
    """Validate a ``POST /v1/chat/completions`` body; raises :class:`InvalidRequest` naming the bad field."""
    fields = _object(body)
    _refuse_unhonoured(fields, CHAT_UNHONOURED)
    tools, choice = parse_tools(fields)
    options = _options(fields, max_tokens_names=("max_completion_tokens", "max_tokens"))
    if choice.calls:
        if options.grammar is not None:
            raise InvalidRequest(
                "'response_format' cannot be combined with tool calls here; leave one out.", param="response_format"
            )
        chosen = [t for t in tools if choice.name in (None, t.name)]
        try:
            grammar = tool_call_grammar(
                [(t.name, t.parameters) for t in chosen], text_allowed=choice.mode == "auto", parallel=choice.parallel
            )
        except InvalidGrammar as exc:
            raise InvalidRequest(f"Invalid 'tools': {exc}", param="tools", code="invalid_value") from None
        options = replace(options, grammar=grammar)
    return ChatCompletionRequest(
        model=_model(fields, default_model),
        messages=_messages(fields.get("messages")),
        options=options,
        tools=tools,
        tool_choice=choice,
        grounding=_optional_bool(fields, "grounding"),
    )


def _optional_bool(fields: dict[str, Any], name: str) -> bool | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, bool):
        raise _wrong_type(name, "a boolean", value)
    return value


def parse_completion_request(body: Any, default_model: str | None = None) -> CompletionRequest:
    """Validate a ``POST /v1/completions`` body: ``prompt`` is a string or a list holding one string."""
    fields = _object(body)
    _refuse_unhonoured(fields, COMPLETION_UNHONOURED)
    best_of = _integer(fields, "best_of", minimum=1)
    if best_of not in (None, 1):
        raise InvalidRequest("Only best_of=1 is supported.", param="best_of", code="unsupported_value")
    return CompletionRequest(
        model=_model(fields, default_model),
        prompt=_prompt(fields.get("prompt")),
        options=_options(fields, max_tokens_names=("max_tokens",)),
    )


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, but got {_json_type(body)} instead.", code="invalid_type"
        )
    return body


def _model(fields: dict[str, Any], default: str | None) -> str:
    model = fields.get("model")
    if model is None and default is not None:
        return default
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model", code="missing_required_parameter")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)
    if not model:
        raise InvalidRequest("Invalid 'model': empty string.", param="model", code="invalid_value")
    return model


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if value is None:
        raise InvalidRequest(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required_parameter"
        )
    if not isinstance(value, list):
        raise _wrong_type("messages", "an array", value)
    if not value:
        raise InvalidRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            param="messages",
            code="empty_array",
        )
    return tuple(_message(item, f"messages[{i}]") for i, item in enumerate(value))


def _message(item: Any, where: str) -> ChatMessage:
    if not isinstance(item, dict):
        raise _wrong_type(where, "an object", item)
    role = item.get("role")
    if role is None:
        raise InvalidRequest(
            f"Missing required parameter: '{where}.role'.", param=f"{where}.role", code="missing_required_parameter"
        )
    if role not in ROLES:
        supported = ", ".join(f"'{r}'" for r in ROLES)
        raise InvalidRequest(
            f"Invalid value: {role!r}. Supported values are: {supported}.", param=f"{where}.role", code="invalid_value"
        )
    if item.get("function_call"):
        raise InvalidRequest(
            f"Invalid '{where}.function_call': the deprecated function calls are not supported; use tool_calls.",
            param=f"{where}.function_call",
            code="unsupported_value",
        )
    calls = parse_message_calls(item.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else ()
    content = item.get("content")
    if content is None and role == "assistant":
        content = ""  # an assistant turn with nothing to say but its tool calls
    call_id = item.get("tool_call_id") if role == "tool" else None
    return ChatMessage(role, _content(content, f"{where}.content"), calls, str(call_id) if call_id else None)


def _content(content: Any, where: str) -> str:
    """Message content: a string, or a list of ``{"type": "text", "text": ...}`` parts joined together."""
    if isinstance(content, str):
        return content
    if content is None:
        raise InvalidRequest(f"Missing required parameter: '{where}'.", param=where, code="missing_required_parameter")
    if not isinstance(content, list):
        raise _wrong_type(where, "a string or an array of content parts", content)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            raise _wrong_type(f"{where}[{i}]", "an object", part)
        if part.get("type") != "text":
            raise InvalidRequest(
                f"Invalid '{where}[{i}].type': only 'text' content parts are supported, got {part.get('type')!r}.",
                param=f"{where}[{i}].type",
                code="unsupported_value",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _wrong_type(f"{where}[{i}].text", "a string", text)
        texts.append(text)
    return "".join(texts)


def _prompt(value: Any) -> str:
    if value is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise InvalidRequest(
                "Invalid 'prompt': token id prompts are not supported; send the prompt as text.",
                param="prompt",
                code="unsupported_value",
            )
        if len(value) != 1:
            raise InvalidRequest(
                f"Invalid 'prompt': this server takes one prompt per request, got {len(value)}.",
                param="prompt",
                code="unsupported_value",
            )
        value = value[0]
    if not isinstance(value, str):
        raise _wrong_type("prompt", "a string or an array of one string", value)
    if not value:
        raise InvalidRequest("Invalid 'prompt': empty string.", param="prompt", code="invalid_value")
    return value


def _options(fields: dict[str, Any], max_tokens_names: tuple[str, ...]) -> GenerationOptions:
    n = _integer(fields, "n", minimum=1)
    if n not in (None, 1):
        raise InvalidRequest("Only n=1 is supported.", param="n", code="unsupported_value")
    max_tokens = None
    for name in max_tokens_names:  # max_completion_tokens replaces the deprecated max_tokens
        max_tokens = _integer(fields, name, minimum=1)
        if max_tokens is not None:
            break
    stream = _boolean(fields, "stream") or False
    include_usage = False
    stream_options = fields.get("stream_options")
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _wrong_type("stream_options", "an object", stream_options)
        include_usage = _boolean(stream_options, "include_usage", where="stream_options.") or False
    temperature = _number(fields, "temperature", minimum=0.0, maximum=2.0)
    top_p = _number(fields, "top_p", minimum=0.0, maximum=1.0, exclusive_minimum=True)
    return GenerationOptions(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        max_tokens=max_tokens,
        stop=_stop(fields.get("stop")),
        seed=_seed(fields),
        stream=stream,
        ignore_eos=_boolean(fields, "ignore_eos") or False,
        include_usage=include_usage,
        presence_penalty=_number(fields, "presence_penalty", *PENALTY_RANGE) or 0.0,
        frequency_penalty=_number(fields, "frequency_penalty", *PENALTY_RANGE) or 0.0,
        logit_bias=_logit_bias(fields.get("logit_bias")),
        grammar=response_format_grammar(fields.get("response_format")),
    )


def response_format_grammar(value: Any, param: str = "response_format") -> str | None:
    """OpenAI's ``response_format`` as the grammar the answer must match: None for ``text``, any JSON object for
    ``json_object``, the schema's documents for ``json_schema`` (``strict`` forbids keywords the compiler lacks)."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"Invalid '{param}': expected an object whose 'type' is one of {', '.join(RESPONSE_FORMATS)}.",
            param=param,
            code="invalid_value",
        )
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        schema, strict = ANY_JSON_OBJECT, False
    else:
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise _wrong_type(f"{param}.json_schema", "an object with a 'schema' object", spec)
        schema, strict = spec.get("schema", {}), spec.get("strict") is True
    try:
        return json_schema_grammar(schema, strict=strict)
    except InvalidGrammar as exc:
        raise InvalidRequest(f"Invalid '{param}': {exc}", param=param, code="invalid_value") from None


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's map of token ids (as strings) to a bias in [-100, 100]; the engine checks the ids against its
    vocabulary."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise _wrong_type("logit_bias", "an object mapping token ids to numbers", value)
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise InvalidRequest(
            f"Invalid 'logit_bias': at most {MAX_LOGIT_BIAS_ENTRIES} tokens, got {len(value)}.",
            param="logit_bias",
            code="invalid_value",
        )
    bias = []
    for key, number in value.items():
        if not (key.isascii() and key.isdigit() and len(key) <= 9):
            raise InvalidRequest(
                f"Invalid 'logit_bias': keys are token ids (non-negative integers as strings), got {key!r}.",
                param="logit_bias",
                code="invalid_value",
            )
        amount = _number({"logit_bias": number}, "logit_bias", *LOGIT_BIAS_RANGE)
        if amount is None:
            raise _wrong_type("logit_bias", "an object mapping token ids to numbers", number)
        bias.append((int(key), amount))
    return tuple(bias)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise _wrong_type("stop", "a string or an array of strings", value)
    if len(value) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"Invalid 'stop': array too long. Expected at most {MAX_STOP_SEQUENCES} items, got {len(value)}.",
            param="stop",
            code="array_above_max_length",
        )
    return tuple(s for s in value if s)


def _seed(fields: dict[str, Any]) -> int | None:
    """Any 64-bit seed, signed or not; mapped onto the unsigned range the sampler's PRNG takes."""
    seed = _integer(fields, "seed", minimum=_SEED_RANGE[0], maximum=_SEED_RANGE[1])
    return None if seed is None else seed % 2**64


def _number(
    fields: dict[str, Any], name: str, minimum: float, maximum: float, exclusive_minimum: bool = False
) -> float | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _wrong_type(name, "a number", value)
    if not math.isfinite(value):  # Python's json accepts NaN and Infinity
        raise InvalidRequest(f"Invalid '{name}': expected a finite number.", param=name, code="invalid_value")
    too_low = value <= minimum if exclusive_minimum else value < minimum
    if too_low:
        bound = f"> {minimum:g}" if exclusive_minimum else f">= {minimum:g}"
        raise InvalidRequest(
            f"Invalid '{name}': expected a value {bound}, but got {value} instead.",
            param=name,
            code="decimal_below_min_value",
        )
    if value > maximum:
        raise InvalidRequest(
            f"Invalid '{name}': expected a value <= {maximum:g}, but got {value} instead.",
            param=name,
            code="decimal_above_max_value",
        )
    return float(value)


def _integer(
    fields: dict[str, Any], name: str, minimum: int | None = None, maximum: int | None = None, where: str = ""
) -> int | None:
    value = fields.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # some clients serialise every number as a float
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(where + name, "an integer", value)
    if minimum is not None and value < minimum:
        raise InvalidRequest(
            f"Invalid '{where}{name}': expected a value >= {minimum}, but got {value} instead.",
            param=where + name,
            code="integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        raise InvalidRequest(
            f"Invalid '{where}{name}': expected a value <= {maximum}, but got {value} instead.",
            param=where + name,
            code="integer_above_max_value",
        )
    return value


def _boolean(fields: dict[str, Any], name: str, where: str = "") -> bool | None:
    value = fields.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise _wrong_type(where + name, "a boolean", value)


def _wrong_type(param: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# -- responses ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseMeta:
    """What every body (or chunk) of one response repeats: its id, creation time and model name."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(f"{prefix}-{secrets.token_hex(12)}", int(time.time()), model)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    meta: ResponseMeta, text: str | None, finish_reason: str, usage: dict[str, int], tool_calls: list | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage,
    }


def chat_chunk(
    meta: ResponseMeta, delta: dict[str, str], finish_reason: str | None, with_usage: bool
) -> dict[str, Any]:
    """One streamed chat delta; ``with_usage`` adds ``"usage": null`` (set when the client asked for usage)."""
    chunk = {
        "id": meta.id,
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if with_usage:
        chunk["usage"] = None
    return chunk


def text_completion(
    meta: ResponseMeta, text: str, finish_reason: str | None, usage: dict[str, int] | None = None
) -> dict[str, Any]:
    """A ``text_completion`` body; streamed chunks share the shape, with ``finish_reason`` null until the end."""
    body: dict[str, Any] = {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def usage_chunk(meta: ResponseMeta, object: str, usage: dict[str, int]) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, only usage."""
    return {
        "id": meta.id,
        "object": object,
        "created": meta.created,
        "model": meta.model,
        "choices": [],
        "usage": usage,
    }
