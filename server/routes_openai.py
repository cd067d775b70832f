"""The OpenAI-compatible endpoints: chat completions, text completions and the model list.

Each handler reads and validates the body (:mod:`solverx.server.schemas`), resolves the model name
(:mod:`solverx.server.models`), and runs the engine. Streaming handlers wait for the first delta before answering, so a
prompt that is too long or an unusable adapter still gets its proper status code instead of an error event
inside a 200 stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from jinja2.exceptions import TemplateError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from solverx.engine.core import Delta, EngineError
from solverx.server import schemas
from solverx.server.body import read_json
from solverx.server.errors import InvalidRequest, ModelNotFound, to_api_error
from solverx.server.grounding import Grounded, ground
from solverx.server.metrics import track_generation
from solverx.server.state import server_state
from solverx.server.streaming import (
    EventStream,
    cancel_on_disconnect,
    chat_events,
    completion_events,
    prepend,
    tool_chat_events,
)
from solverx.server.tools import parse_calls

if TYPE_CHECKING:
    from solverx.engine.core import Engine
    from solverx.server.models import Resolved
    from solverx.server.state import ServerState

__all__ = ["routes"]


class _Endpoint(NamedTuple):
    """What differs between chat and text completions once the prompt is tokenized."""

    id_prefix: str
    prompt_param: str  # the field blamed when the prompt does not fit the context
    events: Callable[[schemas.ResponseMeta, AsyncIterator[Delta], bool], AsyncIterator[bytes]]
    body: Callable[[schemas.ResponseMeta, str, str, dict[str, int]], dict[str, Any]]


CHAT = _Endpoint("chatcmpl", "messages", chat_events, schemas.chat_completion)
TOOL_CHAT = _Endpoint("chatcmpl", "messages", tool_chat_events, schemas.chat_completion)
TEXT = _Endpoint("cmpl", "prompt", completion_events, schemas.text_completion)


async def chat_completions(request: Request) -> Response:
    state = server_state(request)
    req = schemas.parse_chat_request(await read_json(request, state.max_body_bytes), state.default_model)
    target = state.catalog.resolve(req.model)
    messages = req.template_messages(target.engine.chat_rules.native_tools)
    grounded = ground(target.grounding, messages, req.grounding)
    try:
        prompt = req.encode(target.engine, grounded.messages)
    except TemplateError as exc:
        raise InvalidRequest(f"The chat template rejected these messages: {exc}", param="messages") from exc
    endpoint = TOOL_CHAT if req.tool_choice.calls else CHAT
    return await _complete(request, state, target, prompt, req.options, endpoint, grounded)


async def completions(request: Request) -> Response:
    state = server_state(request)
    req = schemas.parse_completion_request(await read_json(request, state.max_body_bytes), state.default_model)
    target = state.catalog.resolve(req.model)
    prompt = target.engine.encode_prompt(req.prompt)
    return await _complete(request, state, target, prompt, req.options, TEXT)


async def _complete(
    request: Request,
    state: ServerState,
    target: Resolved,
    prompt: list[int],
    options: schemas.GenerationOptions,
    endpoint: _Endpoint,
    grounded: Grounded | None = None,
) -> Response:
    """Run the engine and answer with one body, or with an event stream once the first delta is in; a grounded
    chat says which facts it was given (headers; a ``grounding`` field in a body)."""
    headers = grounded.headers() if grounded is not None else {}
    extra = grounded.body_field() if grounded is not None and grounded.facts else {}
    params = options.sampling(completion_budget(state, target.engine, options, len(prompt)))
    meta = schemas.ResponseMeta.new(endpoint.id_prefix, target.display_name)
    deltas = track_generation(request, target.display_name, target.engine.generate(prompt, params, target.adapter))
    if options.stream:
        first = await first_delta(deltas, param=endpoint.prompt_param)
        return EventStream(endpoint.events(meta, prepend(first, deltas), options.include_usage), headers)
    text, last = await cancel_on_disconnect(request.receive, lambda: collect(deltas, param=endpoint.prompt_param))
    counts = schemas.usage(last.prompt_tokens, last.completion_tokens)
    finish = last.finish_reason or "stop"
    if endpoint is TOOL_CHAT:
        content, calls = parse_calls(text)
        finish = "tool_calls" if calls and finish == "stop" else finish
        return JSONResponse(schemas.chat_completion(meta, content, finish, counts, calls) | extra, headers=headers)
    return JSONResponse(endpoint.body(meta, text, finish, counts) | extra, headers=headers)


async def list_models(request: Request) -> Response:
    cards = server_state(request).catalog.cards()
    return JSONResponse({"object": "list", "data": [card.to_dict() for card in cards]})


async def retrieve_model(request: Request) -> Response:
    model = request.path_params["model"]
    for card in server_state(request).catalog.cards():
        if card.id == model:
            return JSONResponse(card.to_dict())
    raise ModelNotFound.for_model(model)


def completion_budget(
    state: ServerState, engine: Engine, options: schemas.GenerationOptions, prompt_tokens: int
) -> int:
    """The completion budget when the request sets none (up to the cap or the end of the context); a request
    asking for more than the cap is refused."""
    if options.max_tokens is not None and options.max_tokens > state.max_tokens_cap:
        raise InvalidRequest(
            f"max_tokens is too large: {options.max_tokens}. This server allows at most "
            f"{state.max_tokens_cap} completion tokens.",
            param="max_tokens",
            code="integer_above_max_value",
        )
    return max(1, min(state.max_tokens_cap, engine.context_length - prompt_tokens))


async def first_delta(deltas: AsyncIterator[Delta], param: str) -> Delta:
    """The first delta; the engine reports a prompt it cannot run here, before any output."""
    try:
        return await anext(deltas)
    except EngineError as exc:
        raise to_api_error(exc, param=param) from exc
    except BaseException:
        await deltas.aclose()  # type: ignore[attr-defined]
        raise


async def collect(deltas: AsyncIterator[Delta], param: str) -> tuple[str, Delta]:
    """The whole completion as one text and its last delta (finish reason and token counts)."""
    parts: list[str] = []
    last: Delta | None = None
    async with contextlib.aclosing(deltas):  # type: ignore[type-var]
        try:
            async for delta in deltas:
                parts.append(delta.text)
                last = delta
        except EngineError as exc:
            raise to_api_error(exc, param=param) from exc
    assert last is not None, "the engine ends every sequence with a finish reason"
    return "".join(parts), last


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
]
