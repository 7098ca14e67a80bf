"""Server-sent events the way OpenAI's clients read them.

    data: {json}\\n\\n        one per chunk
    : ping\\n\\n              every ``Settings.sse_ping_s`` (proxies drop idle streams: pain point 10)
    data: [DONE]\\n\\n        at the end
    data: {"error": {...}}   instead of [DONE] when the request fails mid-stream; then the stream closes

``stream_response`` commits to a 200 only once the request is past admission (every choice queued
for a phone or running on one: :class:`server.backends.base.Admission`) or has sent its first chunk,
so refusals (queue full -> 429, no phone -> 503) keep their HTTP status however many event-loop
turns they take; a backend that does not report admission gets ``ADMISSION_WAIT_S``. A client that goes
away cancels the chunk iterator (sse-starlette watches ``http.disconnect``), which cancels the
request on the phone (server.serving.driver).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping
from typing import Any, Protocol, TypeVar

import anyio
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response

from server.api.errors import error_body
from server.backends.base import Admission, admission

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
# Longest a stream waits for admission or its first chunk before the 200 goes out: the pool reports
# admission within a few event-loop turns; a backend that does not (a phone on its own, in tests)
# sends its first chunk when the phone accepts the prompt.
ADMISSION_WAIT_S = 1.0
_EMPTY = object()

Chunk = str | bytes | BaseModel | Mapping[str, Any]


def encode_event(chunk: Chunk) -> bytes:
    """One ``data:`` event; ``str`` is taken as JSON text already."""
    if isinstance(chunk, bytes):
        payload = chunk
    elif isinstance(chunk, str):
        payload = chunk.encode("utf-8")
    elif isinstance(chunk, BaseModel):
        payload = chunk.model_dump_json().encode("utf-8")
    else:
        import json

        payload = json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"data: " + payload + b"\n\n"


def error_event(exc: BaseException) -> bytes:
    _status, body, _headers = error_body(exc)
    return encode_event(body)


async def _first(chunks: AsyncGenerator[Chunk, None]) -> Any:
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return _EMPTY


async def stream_response(
    chunks: AsyncGenerator[Chunk, None], *, ping_s: float, request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """An SSE response for ``chunks`` (an async generator: it is closed in every case).

    Raises the chunk iterator's error when it fails before admission or its first chunk, for the
    exception handlers to answer with a status code.
    """
    ticket = Admission()
    token = admission.set(ticket)
    try:  # the task copies the context: the pool finds the ticket through it
        first = asyncio.ensure_future(_first(chunks))
    finally:
        admission.reset(token)
    admitted = asyncio.ensure_future(ticket.done.wait())
    try:
        await asyncio.wait({first, admitted}, return_when=asyncio.FIRST_COMPLETED, timeout=ADMISSION_WAIT_S)
    finally:
        admitted.cancel()
    if first.done() and first.exception() is not None:
        await chunks.aclose()
        raise first.exception()  # type: ignore[misc]

    async def body() -> AsyncIterator[bytes]:
        try:
            try:
                # shielded: sse-starlette's cancel scope re-cancels at every await; ``first`` must be
                # cancelled once, by us, so that the phone's clean-up runs undisturbed
                item = await asyncio.shield(first)
            except asyncio.CancelledError:
                first.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.wait({first})
                raise
            if item is not _EMPTY:
                yield encode_event(item)
                async for item in chunks:
                    yield encode_event(item)
            yield DONE
        except Exception as exc:  # mid-stream: the status is sent already
            status, _body, _h = error_body(exc)
            if status >= 500:
                logger.error("request %s: stream failed: %s: %s", request_id, type(exc).__name__, exc,
                             exc_info=not hasattr(exc, "status_code"))
            yield error_event(exc)
        finally:
            with anyio.CancelScope(shield=True):
                await chunks.aclose()

    return EventSourceResponse(
        body(),
        headers=dict(headers or {}),
        ping=ping_s,
        sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
    )


async def respond_unless_disconnected(
    request: Request, work: Coroutine[Any, Any, str], *, request_id: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A non-streaming JSON answer (``work`` returns the JSON text). If the client goes away first,
    ``work`` is cancelled, and with it the request on the phone (uvicorn does not cancel handlers)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        logger.info("request %s: client disconnected; generation cancelled", request_id)
        return Response(status_code=499)
    return Response(task.result(), media_type="application/json", headers=dict(headers or {}))


P_contra = TypeVar("P_contra", contravariant=True)


class Service(Protocol[P_contra]):
    """An endpoint family's service (server/serving/base.py): a prepared request as a stream of chunk
    texts, or as one body."""

    def stream(self, p: P_contra) -> AsyncGenerator[str, None]: ...

    async def complete(self, p: P_contra) -> str: ...


async def respond(
    request: Request, service: Service[P_contra], prepared: P_contra, *, stream: bool, request_id: str,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The response to a prepared request: an SSE stream or one JSON body (what every generation
    route ends with)."""
    if stream:
        return await stream_response(
            service.stream(prepared), ping_s=request.app.state.settings.sse_ping_s, request_id=request_id,
            headers=headers,
        )
    return await respond_unless_disconnected(request, service.complete(prepared), request_id=request_id,
                                             headers=headers)
