"""Server-sent events the way OpenAI's clients read them.

    data: {json}\\n\\n        one per chunk
    : ping\\n\\n              every ``Settings.sse_ping_s`` (proxies drop idle streams: pain point 10)
    data: [DONE]\\n\\n        at the end
    data: {"error": {...}}   instead of [DONE] when the request fails mid-stream; then the stream closes

A *typed* stream (the Responses API's, ``typed=True``) names each event as OpenAI's does, from its
JSON's ``type``, and ends without ``[DONE]`` (its last event says it ended)::

    event: response.created\\n
    data: {"type": "response.created", ...}\\n\\n

``stream_response`` commits to a 200 only once the request is past admission (every choice queued
for a phone or running on one: :class:`server.backends.base.Admission`) or has sent its first chunk,
so refusals (queue full -> 429, no phone -> 503) keep their HTTP status however many event-loop
turns they take; a backend that does not report admission gets ``ADMISSION_WAIT_S``.

The chunks are pulled by a task of their own (:class:`_Pump`), at most one ahead of what the
client has taken, and that task is cancelled once, by us, in every way a stream can end early, which
cancels the request on the phone (server.serving.driver):

* the client goes away (sse-starlette watches ``http.disconnect``);
* the client stops reading: no send completes for ``Settings.write_timeout_s`` (the buffers between
  us and the client are full). Logged, and the connection is dropped. What a stream holds meanwhile
  is bounded: 16 KiB in the transport and 32 KiB in the kernel (server/api/connection.py), one
  chunk here, and the events the driver received since (at most the context's tokens, a few KiB);
* the server shuts down and its grace period ends (server/api/shutdown.py): the stream ends with a
  last ``data: {"error": ...}`` event, code ``server_shutting_down``. A client that is not reading
  cannot take that event: ``LAST_EVENT_S`` later its connection is dropped (else the shutdown waited
  for its send, up to ``write_timeout_s``, and uvicorn cut it short with a traceback).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Mapping
from typing import Any, Protocol, TypeVar

import anyio
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from server.api.connection import abort_connection, abort_transport, bound_stream_buffers
from server.api.errors import error_body
from server.api.shutdown import Drain
from server.backends.base import Admission, admission
from server.serving.driver import CLEANUP_TIMEOUT_S

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
# Longest a stream waits for admission or its first chunk before the 200 goes out: the pool reports
# admission within a few event-loop turns; a backend that does not (a phone on its own, in tests)
# sends its first chunk when the phone accepts the prompt. Waited in slices (_wait_admission), so that
# an event loop held by other work (a huge body's validation: seconds) does not use the wait up.
ADMISSION_WAIT_S = 1.0
ADMISSION_SLICE_S = 0.05
# how long a stream stopped by the shutdown has to send its last event before its connection is dropped
LAST_EVENT_S = 1.0

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
        payload = json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"data: " + payload + b"\n\n"


def encode_typed_event(chunk: Chunk) -> bytes:
    """One event of a typed stream: ``event: <the JSON's type>``, then its ``data:`` line."""
    data = encode_event(chunk)
    kind = json.loads(data[len(b"data: "):])["type"]
    return f"event: {kind}\n".encode() + data


def error_event(exc: BaseException) -> bytes:
    _status, body, _headers = error_body(exc)
    return encode_event(body)


_END = object()  # the chunks are over
_STOPPED = object()  # the drain expired: the stream ends with an error event


class _Pump:
    """``chunks`` pulled by a task of its own, one chunk ahead of the consumer at most.

    ``next()`` is the next chunk, an exception the chunks raised, ``_END``, or ``_STOPPED`` after
    ``stop()``. ``close()`` cancels the task once and waits for it (shielded, bounded): the
    generator's clean-up, the phone's cancellation included, runs in that task undisturbed."""

    def __init__(self, chunks: AsyncGenerator[Chunk, None]) -> None:
        self._chunks = chunks
        self._items: collections.deque[Any] = collections.deque()
        self._ready = asyncio.Event()
        self._taken = asyncio.Event()
        self._cancelled = False
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            async for item in self._chunks:
                self._push(item)
                self._taken.clear()
                await self._taken.wait()
            self._push(_END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, raised there
            self._push(exc)
        finally:
            await self._chunks.aclose()

    def _push(self, item: Any) -> None:
        self._items.append(item)
        self._ready.set()

    async def next(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        self._taken.set()
        return item

    def stop(self) -> None:
        """Cancel the chunks now; ``next()`` gives what was pulled already, then ``_STOPPED``."""
        self._cancel()
        self._push(_STOPPED)

    def _cancel(self) -> None:
        # once: a second cancel would land in the generation's clean-up (the phone's cancel and the
        # wait for its done) and cut it short
        if not self._cancelled:
            self._cancelled = True
            self.task.cancel()

    async def close(self, request_id: str | None) -> None:
        self._cancel()
        with anyio.CancelScope(shield=True):
            done, _ = await asyncio.wait({self.task}, timeout=CLEANUP_TIMEOUT_S + 1)
        if not done:
            logger.error("request %s: the stream's generation did not end within %.0f s", request_id,
                         CLEANUP_TIMEOUT_S + 1)


class _EventStream(EventSourceResponse):
    """sse-starlette's response; a send that times out (the client stopped reading) is logged and
    drops the connection instead of being an error of the app; so does a send still waiting
    ``LAST_EVENT_S`` after the drain expired (module docstring)."""

    def __init__(self, *args: Any, request_id: str | None, drain: Drain | None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.request_id = request_id
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.send_timeout is not None:
            bound_stream_buffers(scope)
        watch = _SendWatch(send)
        try:
            with self.drain.on_expire(lambda: watch.cut_when_stuck(scope, self.request_id)) \
                    if self.drain is not None else contextlib.nullcontext():
                await super().__call__(scope, receive, watch.send)
        except SendTimeoutError:
            dropped = await abort_connection(scope)
            logger.warning("request %s: the client took no data for %.0f s (write_timeout_s): generation "
                           "cancelled on its phone, connection %s", self.request_id, self.send_timeout,
                           "dropped" if dropped else "closed")
        finally:
            watch.stop()


class _SendWatch:
    """``send``, knowing whether one is waiting; once asked (the drain expired), drops the connection
    when a send has been waiting ``LAST_EVENT_S`` (the client is not reading: it cannot take the last
    event, and the shutdown would wait for it). A client that reads gets its stream to the end."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._waiting = 0  # sends in progress
        self._since = 0  # sends completed, to tell one send that waits from several quick ones
        self._timer: asyncio.TimerHandle | None = None

    async def send(self, message: Message) -> None:
        self._waiting += 1
        try:
            await self._send(message)
        finally:
            self._waiting -= 1
            self._since += 1

    def cut_when_stuck(self, scope: Scope, request_id: str | None, seen: int | None = None) -> None:
        if seen is not None and self._waiting and self._since == seen:
            if abort_transport(scope):
                logger.warning("request %s: the client took no data since the shutdown cancelled it: "
                               "connection dropped", request_id)
            return
        self._timer = asyncio.get_running_loop().call_later(
            LAST_EVENT_S, self.cut_when_stuck, scope, request_id, self._since)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


async def _wait_admission(futures: set[asyncio.Future[Any]]) -> None:
    """Until one of ``futures`` is done, or ``ADMISSION_WAIT_S`` in slices of ``ADMISSION_SLICE_S``.
    A slice ends with a turn of the loop for the stream's task, however long the loop was held
    meanwhile: a stall stretches a slice instead of using the wait up before the request could reach
    the pool's queue (then a refusal would come inside a 200 stream instead of as a 429)."""
    for _ in range(max(1, round(ADMISSION_WAIT_S / ADMISSION_SLICE_S))):
        done, _pending = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=ADMISSION_SLICE_S)
        if done:
            return


async def stream_response(
    chunks: AsyncGenerator[Chunk, None], *, ping_s: float, request_id: str | None = None,
    headers: Mapping[str, str] | None = None, typed: bool = False, write_timeout_s: float | None = None,
    drain: Drain | None = None,
) -> Response:
    """An SSE response for ``chunks`` (an async generator: it is closed in every case); ``typed``:
    events named by their type, no ``[DONE]``. ``write_timeout_s`` and ``drain``: the module docstring.

    Raises the chunk iterator's error when it fails before admission or its first chunk, for the
    exception handlers to answer with a status code.
    """
    ticket = Admission()
    token = admission.set(ticket)
    try:  # the task copies the context: the pool finds the ticket through it
        pump = _Pump(chunks)
    finally:
        admission.reset(token)
    first = asyncio.ensure_future(pump.next())
    admitted = asyncio.ensure_future(ticket.done.wait())
    try:
        await _wait_admission({first, admitted})
    finally:
        admitted.cancel()
    if first.done() and isinstance(first.result(), BaseException):
        await pump.close(request_id)
        raise first.result()

    async def body() -> AsyncIterator[bytes]:
        encode = encode_typed_event if typed else encode_event
        stopping = drain.on_expire(pump.stop) if drain is not None else contextlib.nullcontext()
        try:
            with stopping:
                try:
                    item = await asyncio.shield(first)
                except asyncio.CancelledError:
                    first.cancel()
                    raise
                while item is not _END:
                    if item is _STOPPED:
                        assert drain is not None
                        logger.warning("request %s: cancelled, the server is shutting down", request_id)
                        yield error_event(drain.error())
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield encode(item)
                    item = await pump.next()
            if not typed:
                yield DONE
        except Exception as exc:  # mid-stream: the status is sent already
            status, _body, _h = error_body(exc)
            if status >= 500:
                logger.error("request %s: stream failed: %s: %s", request_id, type(exc).__name__, exc,
                             exc_info=not hasattr(exc, "status_code"))
            yield error_event(exc)
        finally:
            await pump.close(request_id)

    return _EventStream(
        body(),
        headers=dict(headers or {}),
        ping=ping_s,
        sep="\n",
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
        send_timeout=write_timeout_s,
        cleanup_timeout=None,  # the pump bounds its own clean-up
        request_id=request_id,
        drain=drain,
    )


async def respond_unless_disconnected(
    request: Request, work: Coroutine[Any, Any, str], *, request_id: str | None = None,
    headers: Mapping[str, str] | None = None, drain: Drain | None = None,
) -> Response:
    """A non-streaming JSON answer (``work`` returns the JSON text). If the client goes away first,
    ``work`` is cancelled, and with it the request on the phone (uvicorn does not cancel handlers);
    so it is when the ``drain`` expires (shutdown), and the answer is then its 503."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watchers: set[asyncio.Future[Any]] = {asyncio.ensure_future(disconnected())}
    if drain is not None:
        watchers.add(asyncio.ensure_future(drain.expired.wait()))
    try:
        await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watcher in watchers:
            watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled() and drain is not None and drain.expired.is_set():
        logger.warning("request %s: cancelled, the server is shutting down", request_id)
        status, body, error_headers = error_body(drain.error())  # expected: logged above, not as an error
        return JSONResponse(body, status_code=status, headers=error_headers)
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
    headers: Mapping[str, str] | None = None, typed: bool = False,
) -> Response:
    """The response to a prepared request: an SSE stream or one JSON body (what every generation
    route ends with)."""
    settings = request.app.state.settings
    drain = getattr(request.app.state, "drain", None)
    if stream:
        return await stream_response(
            service.stream(prepared), ping_s=settings.sse_ping_s, request_id=request_id, headers=headers,
            typed=typed, write_timeout_s=settings.write_timeout_s, drain=drain,
        )
    return await respond_unless_disconnected(request, service.complete(prepared), request_id=request_id,
                                             headers=headers, drain=drain)
