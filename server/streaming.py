"""Server-sent events for streamed completions, and freeing the engine the moment a client goes away.

A stream is ``data: {json}\\n\\n`` events ending with ``data: [DONE]\\n\\n``, as OpenAI sends them. The engine
frees a sequence's batch slot when its async generator is closed, so every path out of a response — the last
token, an error, or a client disconnect (Starlette cancels the stream when uvicorn reports it) — closes the
generator explicitly rather than leaving it to the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from solverx.server import schemas
from solverx.server.errors import to_api_error
from solverx.server.tools import parse_calls

if TYPE_CHECKING:
    from solverx.engine.core import Delta

__all__ = [
    "DONE",
    "EventStream",
    "cancel_on_disconnect",
    "chat_events",
    "completion_events",
    "prepend",
    "sse",
    "tool_chat_events",
]

log = logging.getLogger("solverx.server")

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response that always closes its event iterator, however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str] | None = None):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]


def chat_events(meta: schemas.ResponseMeta, deltas: AsyncIterator[Delta], include_usage: bool) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events: the role, content deltas, the finish reason, then usage if asked."""

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield schemas.chat_chunk(meta, {"role": "assistant", "content": ""}, None, include_usage)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if delta.text:
                    yield schemas.chat_chunk(meta, {"content": delta.text}, None, include_usage)
                if delta.finish_reason is not None:
                    yield schemas.chat_chunk(meta, {}, delta.finish_reason, include_usage)
                    if include_usage:
                        counts = schemas.usage(delta.prompt_tokens, delta.completion_tokens)
                        yield schemas.usage_chunk(meta, "chat.completion.chunk", counts)

    return _encode(chunks())


def tool_chat_events(
    meta: schemas.ResponseMeta, deltas: AsyncIterator[Delta], include_usage: bool
) -> AsyncIterator[bytes]:
    """Chat chunks for a request that may call tools: free text streams as it comes; an answer that starts with a
    call (``<``, which the grammar keeps free text from starting with) is held until it is complete, then sent
    as one ``tool_calls`` delta per call and ``finish_reason: "tool_calls"``, as OpenAI streams them."""

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield schemas.chat_chunk(meta, {"role": "assistant", "content": ""}, None, include_usage)
        held: list[str] | None = None  # the answer so far, while it is calls
        seen = ""
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if held is None and not seen and delta.text:
                    seen = delta.text
                    if delta.text.lstrip().startswith("<"):
                        held = []
                if held is not None:
                    held.append(delta.text)
                elif delta.text:
                    yield schemas.chat_chunk(meta, {"content": delta.text}, None, include_usage)
                if delta.finish_reason is None:
                    continue
                finish = delta.finish_reason
                if held is not None:
                    content, calls = parse_calls("".join(held))
                    if content:
                        yield schemas.chat_chunk(meta, {"content": content}, None, include_usage)
                    for index, call in enumerate(calls):
                        yield schemas.chat_chunk(meta, {"tool_calls": [{"index": index, **call}]}, None, include_usage)
                    finish = "tool_calls" if calls and finish == "stop" else finish
                yield schemas.chat_chunk(meta, {}, finish, include_usage)
                if include_usage:
                    counts = schemas.usage(delta.prompt_tokens, delta.completion_tokens)
                    yield schemas.usage_chunk(meta, "chat.completion.chunk", counts)

    return _encode(chunks())


def completion_events(
    meta: schemas.ResponseMeta, deltas: AsyncIterator[Delta], include_usage: bool
) -> AsyncIterator[bytes]:
    """``text_completion`` events: text deltas, the last one with its finish reason, then usage if asked."""

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if delta.text or delta.finish_reason is not None:
                    yield schemas.text_completion(meta, delta.text, delta.finish_reason)
                if delta.finish_reason is not None and include_usage:
                    counts = schemas.usage(delta.prompt_tokens, delta.completion_tokens)
                    yield schemas.usage_chunk(meta, "text_completion", counts)

    return _encode(chunks())


async def prepend(first: Delta, rest: AsyncIterator[Delta]) -> AsyncIterator[Delta]:
    """``first`` (already awaited, so errors before any output became a proper HTTP status) then ``rest``."""
    async with contextlib.aclosing(rest):
        yield first
        if first.finish_reason is None:
            async for delta in rest:
                yield delta


async def _encode(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """SSE bytes. An error after the response started can only be reported inside the stream: it becomes a
    final ``data: {"error": ...}`` event, which the OpenAI SDK raises as an APIError."""
    async with contextlib.aclosing(chunks):
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except Exception as exc:
            error = to_api_error(exc)
            if error.status >= 500 and error.status != 503:
                log.exception("stream failed")
            yield sse(error.body())
    yield DONE


async def cancel_on_disconnect(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work`` until it finishes or the client disconnects; on disconnect cancel it (closing any engine
    generator it holds) and raise :class:`ClientDisconnect`. Call only after the request body was read."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnect()
    return task.result()
