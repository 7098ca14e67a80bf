"""Request bodies before the routes see them: a size bound, content codings, the media type.

:class:`BodyGuardMiddleware` reads the whole body of a request that has one (the routes take JSON
that FastAPI reads whole anyway) and hands it on unchanged, or answers in the OpenAI envelope:

* **413** ``request_too_large`` (:class:`~server.errors.RequestTooLarge`): a ``Content-Length`` over
  ``Settings.max_body_bytes`` is refused before a byte is read; a chunked upload (no length) is read
  up to the bound and refused as soon as it passes it; so is a compressed body whose *decoded* size
  passes it (a gzip bomb costs at most the bound).
* ``Content-Encoding: gzip`` (or ``x-gzip``) and ``deflate`` are decoded (up to ``MAX_CODINGS`` of
  them, in the order applied), ``identity`` is nothing; any other coding, or more of them, is **415**
  ``unsupported_media_type`` (:class:`~server.errors.UnsupportedMediaType`), and a body that does not
  decode is **400**. Each decoding is bounded by the limit, but runs on the event loop: a chain of
  hundreds of codings, each a near-limit stored gzip of the next, held the loop for seconds.
* **408** ``request_timeout`` (:class:`~server.errors.RequestTimeout`): the body must arrive whole within
  ``Settings.body_timeout_s`` of the headers. uvicorn has no such bound: a client that declared a
  length and sent nothing, or trickled a chunked body a byte at a time (slowloris), held its request
  and its connection for as long as it liked, and kept a shutdown waiting for it. Once the shutdown's
  grace period is over, a body still arriving is answered 503 ``server_shutting_down`` instead.
* A non-empty body whose ``Content-Type`` is not JSON (``application/json`` or ``application/*+json``)
  is 415 naming the type; a body without a ``Content-Type`` is taken as JSON (``curl --data-binary``
  without ``-H``; FastAPI alone would take it as bytes and answer a puzzling 400).

The client's ``http.disconnect`` still reaches the app: once the body is handed over, ``receive``
is the server's own again (the disconnect watchers of server/api/sse.py depend on it).
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import error_body
from server.api.shutdown import Drain
from server.errors import InvalidRequest, QhxError, RequestTimeout, RequestTooLarge, UnsupportedMediaType

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Clients apply one coding; a few more are allowed. The bound is on the work: each decoding may cost
# up to max_bytes of inflating on the event loop (urllib3 bounds its chain of response codings too).
MAX_CODINGS = 4


class BodyGuardMiddleware:
    """The size bound, content codings and media type of request bodies (module docstring)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float = 60.0, drain: Drain | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            self._check_length(headers)
            body, disconnected = await self._read(receive)
            if disconnected:
                return  # the client left while sending: nobody to answer
            body = self._decode(body, headers)
            _check_media_type(body, headers)
        except QhxError as exc:  # 4xx, or the shutdown's 503 (expected: the drain logs it)
            status, content, extra = error_body(exc)
            response = JSONResponse(content, status_code=status, headers=extra)
            response.headers["Connection"] = "close"  # the rest of the body may still be on its way
            await response(scope, receive, send)
            return
        scope = _as_read(scope, body, headers)
        await self.app(scope, _replay(body, receive), send)

    def _check_length(self, headers: Headers) -> None:
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_large(f"{int(declared)} bytes")

    async def _read(self, receive: Receive) -> tuple[bytes, bool]:
        parts: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        expired = asyncio.ensure_future(self.drain.expired.wait()) if self.drain is not None else None
        try:
            while True:
                message = await self._next(receive, deadline, expired)
                if message["type"] == "http.disconnect":
                    return b"", True
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_bytes:
                    raise self._too_large(f"more than {self.max_bytes} bytes")
                parts.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(parts), False
        finally:
            if expired is not None:
                expired.cancel()

    async def _next(self, receive: Receive, deadline: float, expired: asyncio.Future[Any] | None) -> Message:
        """The next body message, unless the deadline passes or the shutdown's grace period ends first."""
        got = asyncio.ensure_future(receive())
        waits: set[asyncio.Future[Any]] = {got} if expired is None else {got, expired}
        try:
            await asyncio.wait(waits, timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not got.done():
                got.cancel()
        if got.done() and not got.cancelled():
            return got.result()
        if expired is not None and expired.done():
            assert self.drain is not None
            raise self.drain.error()
        raise RequestTimeout(f"The request body did not arrive within {self.timeout_s:g} s of its headers "
                             "(setting body_timeout_s).")

    def _decode(self, body: bytes, headers: Headers) -> bytes:
        codings = [c.strip().lower() for c in headers.get("content-encoding", "").split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        if len(codings) > MAX_CODINGS:
            raise UnsupportedMediaType(
                f"Content-Encoding lists {len(codings)} codings; this server decodes at most {MAX_CODINGS} "
                "(one is what clients send).", param=None,
            )
        for coding in reversed(codings):  # listed in the order they were applied
            wbits = _DECODERS.get(coding)
            if wbits is None:
                raise UnsupportedMediaType(
                    f"Content-Encoding {coding!r} is not supported; send the body as is, or gzip or deflate it.",
                    param=None,
                )
            body = self._decompress(body, coding, wbits)
        return body

    def _decompress(self, data: bytes, coding: str, wbits: int) -> bytes:
        """``data`` decoded, never more than the bound (a gzip body may hold several members)."""
        out = bytearray()
        while data:
            decoder = zlib.decompressobj(wbits)
            try:
                out += decoder.decompress(data, self.max_bytes + 1 - len(out))
            except zlib.error as exc:
                raise InvalidRequest(f"The body is not valid {coding} data ({exc}).", code="invalid_body") from None
            if len(out) > self.max_bytes or decoder.unconsumed_tail:
                raise self._too_large(f"more than {self.max_bytes} bytes once {coding}-decoded")
            if not decoder.eof:
                raise InvalidRequest(f"The body is truncated {coding} data.", code="invalid_body")
            data = decoder.unused_data
        return bytes(out)

    def _too_large(self, size: str) -> RequestTooLarge:
        return RequestTooLarge(
            f"The request body is {size}; this server accepts at most {self.max_bytes} bytes "
            "(setting max_body_bytes)."
        )


def _check_media_type(body: bytes, headers: Headers) -> None:
    declared = headers.get("content-type")
    if not body or declared is None:
        return
    media = declared.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise UnsupportedMediaType(
        f"Content-Type {media or declared!r} is not supported: send the body as JSON with "
        "'Content-Type: application/json'."
    )


def _as_read(scope: Scope, body: bytes, headers: Headers) -> Scope:
    """The scope as the routes should see the body: decoded (no Content-Encoding, its real length),
    and JSON when it did not say (FastAPI would otherwise take an undeclared body as bytes)."""
    drop = set()
    extra = []
    if "content-encoding" in headers:
        drop |= {b"content-encoding", b"content-length"}
        extra.append((b"content-length", str(len(body)).encode("ascii")))
    if body and "content-type" not in headers:
        extra.append((b"content-type", b"application/json"))
    if not extra:
        return scope
    return {**scope, "headers": [*((k, v) for k, v in scope["headers"] if k not in drop), *extra]}


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives the body once, then is the server's own (disconnects)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
