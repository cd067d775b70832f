"""Ollama's own protocol beside OpenAI's, for the chat clients that speak only it: ``/api/chat``, ``/api/generate``
(NDJSON streams), ``/api/tags``, ``/api/show`` and ``/api/version``.

A request is translated into the OpenAI request it means and validated by :mod:`solverx.server.schemas`, so both
protocols accept and refuse exactly the same things; an error names Ollama's field (``options.num_predict``, not
``max_tokens``) in Ollama's error body, ``{"error": "..."}``. Model names follow Ollama's ``name:tag``: a base or
an adapter is ``name:latest`` (or plain ``name``), a pinned version ``solverx@3`` is ``solverx:3``. ``format``
(``"json"`` or a JSON schema) is a structured output.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from jinja2.exceptions import TemplateError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from solverx.adapters.errors import AdapterError
from solverx.engine.core import Delta, EngineError
from solverx.server import schemas
from solverx.server.body import read_json
from solverx.server.errors import APIError, InvalidRequest, ModelNotFound, to_api_error
from solverx.server.grounding import ground
from solverx.server.metrics import track_generation
from solverx.server.routes_openai import collect, completion_budget, first_delta
from solverx.server.state import server_state
from solverx.server.streaming import prepend

__all__ = ["OLLAMA_VERSION", "ollama_name", "routes"]

OLLAMA_VERSION = "0.9.0"  # the Ollama API whose fields this module speaks; clients gate features on it
LATEST = "latest"
# Ollama option -> the OpenAI field it means.
OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "num_predict": "max_tokens",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
# Options that change the answer and that we do not implement: refused unless they hold their neutral value.
UNHONOURED_OPTIONS = {
    "top_k": (0,), "min_p": (0, 0.0), "typical_p": (1, 1.0), "repeat_penalty": (1, 1.0), "repeat_last_n": (0, 64),
    "mirostat": (0,), "mirostat_tau": (), "mirostat_eta": (), "tfs_z": (1, 1.0), "penalize_newline": (False,),
}  # fmt: skip
# Options about resources, not the answer: accepted and ignored, as Ollama's documentation allows.
RESOURCE_OPTIONS = {
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "low_vram", "use_mmap", "use_mlock",
    "numa", "vocab_only",
}  # fmt: skip


def ollama_name(model_id: str) -> str:
    """``solverx@3`` → ``solverx:3``; anything else gets the ``latest`` tag."""
    name, at, version = model_id.rpartition("@")
    return f"{name}:{version}" if at else f"{model_id}:{LATEST}"


def model_id(name: str) -> str:
    """The inverse of :func:`ollama_name`, also for a name given without a tag."""
    base, colon, tag = name.rpartition(":")
    if not colon:
        return name
    return base if tag == LATEST else f"{base}@{tag}"


# -- requests ------------------------------------------------------------------------------------------------


def _openai_fields(body: Any, stream_default: bool = True) -> tuple[dict[str, Any], bool]:
    """The OpenAI fields an Ollama body means, and whether it streams; refuses what we cannot honour by name."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    for name in ("images", "tools", "suffix", "template", "context"):
        if body.get(name):
            raise _unsupported(name)
    if body.get("think") not in (None, False):
        raise _unsupported("think")
    if body.get("raw"):
        raise _unsupported("raw")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("'model' is required: a model name from /api/tags.", param="model")
    fields: dict[str, Any] = {"model": model_id(model)}
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidRequest("'options' must be an object.", param="options", code="invalid_type")
    for name, value in options.items():
        if name in OPTIONS:
            fields[OPTIONS[name]] = value
        elif name in UNHONOURED_OPTIONS:
            if value not in UNHONOURED_OPTIONS[name]:
                raise _unsupported(f"options.{name}")
        elif name not in RESOURCE_OPTIONS:
            raise InvalidRequest(f"Unknown option 'options.{name}'.", param=f"options.{name}", code="unknown_option")
    if fields.get("max_tokens") in (-1, -2):  # Ollama: no limit (-1), or until the context is full (-2)
        del fields["max_tokens"]
    fmt = body.get("format")
    if fmt == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
    elif fmt not in (None, ""):
        raise InvalidRequest("'format' must be \"json\" or a JSON schema object.", param="format")
    stream = body.get("stream", stream_default)
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream", code="invalid_type")
    return fields, stream


def _unsupported(name: str) -> InvalidRequest:
    return InvalidRequest(
        f"'{name}' is not supported by this server (it would change the answer, and it cannot be honoured here); "
        "leave it out.",
        param=name,
        code="unsupported_parameter",
    )


_OPENAI_TO_OLLAMA = {openai: f"options.{name}" for name, openai in OPTIONS.items()} | {"response_format": "format"}


def _in_ollama_terms(error: InvalidRequest) -> InvalidRequest:
    """An error from the OpenAI validator, naming Ollama's field instead."""
    param = error.param or ""
    head, dot, rest = param.partition(".")
    ours = _OPENAI_TO_OLLAMA.get(head)
    if ours is None:
        return error
    message = error.message.replace(f"'{head}", f"'{ours}")
    return InvalidRequest(message, param=ours + dot + rest, code=error.code)


# -- handlers ------------------------------------------------------------------------------------------------


def _ollama_errors(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Answer errors the way Ollama does (``{"error": message}`` with the status), for clients that read it."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except InvalidRequest as exc:
            return _error(_in_ollama_terms(exc))
        except (APIError, EngineError, AdapterError) as exc:
            return _error(exc if isinstance(exc, APIError) else to_api_error(exc))

    return guarded


def _error(error: APIError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)


async def _request(request: Request, stream_default: bool = True) -> tuple[Any, dict[str, Any], bool]:
    state = server_state(request)
    body = await read_json(request, state.max_body_bytes)
    fields, stream = _openai_fields(body, stream_default)
    return body, fields, stream


async def api_chat(request: Request) -> Response:
    state = server_state(request)
    body, fields, stream = await _request(request)
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if isinstance(message, dict) and (message.get("images") or message.get("tool_calls")):
                raise _unsupported(f"messages[{i}].{'images' if message.get('images') else 'tool_calls'}")
    req = schemas.parse_chat_request({**fields, "messages": messages}, state.default_model)
    target = state.catalog.resolve(req.model)
    grounded = ground(target.grounding, req.template_messages(target.engine.chat_rules.native_tools), req.grounding)
    try:
        prompt = req.encode(target.engine, grounded.messages)
    except TemplateError as exc:
        raise InvalidRequest(f"The chat template rejected these messages: {exc}", param="messages") from exc
    return await _answer(request, target, prompt, req.options, stream, chat=True, headers=grounded.headers())


async def api_generate(request: Request) -> Response:
    state = server_state(request)
    body, fields, stream = await _request(request)
    prompt_text, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt_text, str) or (system is not None and not isinstance(system, str)):
        raise InvalidRequest("'prompt' and 'system' must be strings.", param="prompt", code="invalid_type")
    target = state.catalog.resolve(fields["model"])
    if not prompt_text:  # Ollama's way to load a model: nothing to generate
        return _done_loading(ollama_name(target.display_name))
    # /api/generate applies the model's chat template to the prompt (unless raw, which we refuse)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt_text}]
    req = schemas.parse_chat_request({**fields, "messages": messages}, state.default_model)
    grounded = ground(target.grounding, req.template_messages(), req.grounding)
    prompt = req.encode(target.engine, grounded.messages)
    return await _answer(request, target, prompt, req.options, stream, chat=False, headers=grounded.headers())


def _done_loading(name: str) -> JSONResponse:
    return JSONResponse({"model": name, "created_at": _now(), "response": "", "done": True, "done_reason": "load"})


async def _answer(
    request: Request,
    target,
    prompt: list[int],
    options: schemas.GenerationOptions,
    stream: bool,
    *,
    chat: bool,
    headers: dict[str, str] | None = None,
) -> Response:
    state = server_state(request)
    params = options.sampling(completion_budget(state, target.engine, options, len(prompt)))
    started = time.perf_counter_ns()
    deltas = track_generation(request, target.display_name, target.engine.generate(prompt, params, target.adapter))
    name = ollama_name(target.display_name)
    first = await first_delta(deltas, param="messages" if chat else "prompt")
    if stream:
        lines = _lines(name, first, deltas, started, chat)
        return StreamingResponse(lines, media_type="application/x-ndjson", headers=headers)
    text, last = await collect(prepend(first, deltas), param="messages" if chat else "prompt")
    return JSONResponse(_final(name, text, last, started, chat), headers=headers)


async def _lines(name: str, first: Delta, rest: AsyncIterator[Delta], started: int, chat: bool) -> AsyncIterator[bytes]:
    """NDJSON: one object per piece of text, then the final one with ``done: true`` and the counts."""
    async with contextlib.aclosing(rest):  # type: ignore[type-var]
        delta = first
        while True:
            if delta.finish_reason is not None:
                if delta.text:
                    yield _line(_piece(name, delta.text, chat))
                yield _line(_final(name, "", delta, started, chat))
                return
            if delta.text:
                yield _line(_piece(name, delta.text, chat))
            try:
                delta = await anext(rest)
            except EngineError as exc:  # after the response started: Ollama reports it as a last error line
                yield _line({"error": to_api_error(exc).message})
                return


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _piece(name: str, text: str, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": name, "created_at": _now()}
    body |= {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
    return body | {"done": False}


def _final(name: str, text: str, last: Delta, started: int, chat: bool) -> dict[str, Any]:
    body = _piece(name, text, chat)
    total = time.perf_counter_ns() - started
    return body | {
        "done": True, "done_reason": last.finish_reason or "stop", "total_duration": total, "load_duration": 0,
        "prompt_eval_count": last.prompt_tokens, "eval_count": last.completion_tokens, "eval_duration": total,
    }  # fmt: skip


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def api_tags(request: Request) -> Response:
    cards = server_state(request).catalog.cards()
    return JSONResponse({"models": [_model_entry(card) for card in cards]})


def _model_entry(card) -> dict[str, Any]:
    name = ollama_name(card.id)
    modified = datetime.fromtimestamp(card.created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    base = card.parent or card.id
    details = {"parent_model": ollama_name(card.parent) if card.parent else "", "format": "mlx", "family": base,
               "families": [base], "parameter_size": "", "quantization_level": ""}  # fmt: skip
    return {"name": name, "model": name, "modified_at": modified, "size": 0, "digest": "", "details": details}


async def api_show(request: Request) -> Response:
    state = server_state(request)
    body = await read_json(request, state.max_body_bytes)
    name = body.get("model") or body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest("'model' is required.", param="model")
    wanted = model_id(name)
    card = next((c for c in state.catalog.cards() if c.id == wanted), None)
    if card is None:
        raise ModelNotFound.for_model(name)
    entry = _model_entry(card)
    shown = {"modelfile": "", "parameters": "", "template": "", "details": entry["details"], "model_info": {}}
    return JSONResponse(shown | {"capabilities": ["completion"], "modified_at": entry["modified_at"]})


async def api_version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


routes = [
    Route("/api/chat", _ollama_errors(api_chat), methods=["POST"]),
    Route("/api/generate", _ollama_errors(api_generate), methods=["POST"]),
    Route("/api/tags", _ollama_errors(api_tags), methods=["GET"]),
    Route("/api/show", _ollama_errors(api_show), methods=["POST"]),
    Route("/api/version", api_version, methods=["GET"]),
]
