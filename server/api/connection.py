"""The connection under a request: bounding what a stream buffers, dropping it when its client
has stopped reading.

ASGI has no message for either. :class:`App` (the application itself, where ``send`` is still the
server's own) keeps the connection's transport in the request's state, for:

* :func:`bound_stream_buffers`: a stream's bytes wait for a slow client in the transport (asyncio's
  high-water mark: 64 KiB) and in the kernel (the socket's send buffer, which Linux grows up to
  4 MiB as it sees fit): together enough for a whole 1,000-token stream, so a client that stopped
  reading would hold its phone to the end. For streams both are set to ``STREAM_BUFFER_BYTES``
  (a token is ~200 bytes of SSE: a few seconds of tokens), so that a send waits, and
  ``Settings.write_timeout_s`` (server/api/sse.py) can tell a client that stopped reading;
* :func:`abort_connection`: such a stream is cancelled on its phone, and its connection must go
  too: closing it the ordinary way waits for the unsent data to drain, which a client that does not
  read never lets happen; the transport's ``abort()`` drops the buffers (the kernel sends a reset).

Under uvicorn (h11 or httptools) ``send`` is bound to an object with the ``transport``; under a
server without one, both do nothing and the server's own buffers and close apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

STREAM_BUFFER_BYTES = 16 * 1024
_TRANSPORT = "qhx_transport"


class App(FastAPI):
    """FastAPI, keeping each request's transport in its state (module docstring). Starlette's own
    outermost middleware wraps ``send``: the transport is only reachable here, before it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if isinstance(transport, asyncio.Transport):
                scope.setdefault("state", {})[_TRANSPORT] = transport
        await super().__call__(scope, receive, send)


def bound_stream_buffers(scope: Scope) -> None:
    """Hold at most ``STREAM_BUFFER_BYTES`` for the client in the transport, and as much in the kernel
    (Linux counts twice what is asked: its bookkeeping)."""
    transport: Any = scope.get("state", {}).get(_TRANSPORT)
    if transport is None:
        return
    transport.set_write_buffer_limits(high=STREAM_BUFFER_BYTES)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_BUFFER_BYTES)


def abort_transport(scope: Scope) -> bool:
    """Drop the request's connection now (True), if the server lets us (module docstring); the
    server hears of it on the next turn of the loop (a send waiting for the client returns)."""
    transport: Any = scope.get("state", {}).get(_TRANSPORT)
    if transport is None:
        return False
    transport.abort()
    return True


async def abort_connection(scope: Scope) -> bool:
    """:func:`abort_transport`, the server having heard of it (connection_lost) when this returns."""
    if not abort_transport(scope):
        return False
    await asyncio.sleep(0)
    return True
