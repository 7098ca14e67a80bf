"""Graceful shutdown: a drain with a grace period (docs/reliability.md, "Shutdown").

    SIGTERM -> Drain.begin()       no new requests (uvicorn closes the listener; a request that still
                                   arrives on an open connection is 503 server_shutting_down), /ready
                                   503; requests in flight run on
    grace (Settings.shutdown_grace_s) ends, or a second SIGTERM/SIGINT -> Drain.expire()
                                   what still runs is cancelled on its phone: a stream ends with a last
                                   ``data: {"error": ...}`` event (code server_shutting_down), a
                                   request not streamed gets that 503
    then uvicorn closes the connections, the lifespan closes the pool (every phone's session ends)

The signals are uvicorn's (server/serve.py wires them to the app's :class:`Drain`,
``app.state.drain``); streams and bodies (server/api/sse.py) register with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import error_body
from server.errors import ShuttingDown

logger = logging.getLogger(__name__)

# probes keep answering while the server drains (/ready says it drains)
_OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})


class Drain:
    """The server's shutdown state: draining (no new requests) and, once the grace period is over,
    expired (what still runs is cancelled). Lives on ``app.state.drain``; used on the event loop only."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self.expired = asyncio.Event()
        self.in_flight = 0  # requests being answered (DrainMiddleware counts them)
        self._on_expire: dict[int, Callable[[], None]] = {}
        self._next = 0
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        """Stop taking requests; cancel what still runs after the grace period."""
        if self.draining:
            return
        self.draining = True
        logger.warning("shutting down: no new requests; %d in flight may run for up to %.0f s",
                       self.in_flight, self.grace_s)
        self._timer = asyncio.get_running_loop().call_later(self.grace_s, self.expire)

    def expire(self) -> None:
        """Cancel, now, every request still running (each ends with a clean error)."""
        self.draining = True
        if self.expired.is_set():
            return
        if self._timer is not None:
            self._timer.cancel()
        if self.in_flight:
            logger.warning("shutting down: cancelling the %d request(s) still running", self.in_flight)
        self.expired.set()
        for callback in list(self._on_expire.values()):
            callback()

    @contextlib.contextmanager
    def on_expire(self, callback: Callable[[], None]) -> Iterator[None]:
        """Call ``callback`` if the drain expires while the block runs (at once if it has)."""
        if self.expired.is_set():
            callback()
        key = self._next
        self._next += 1
        self._on_expire[key] = callback
        try:
            yield
        finally:
            self._on_expire.pop(key, None)

    @staticmethod
    def error() -> ShuttingDown:
        return ShuttingDown("The server is shutting down: this request was cancelled. Retry it (on another "
                            "instance, or once this one is back).")


class DrainMiddleware:
    """Counts the requests in flight and, while draining, answers new ones 503 server_shutting_down
    (with ``Connection: close``); the probes stay open."""

    def __init__(self, app: ASGIApp, *, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            status, body, _ = error_body(self.drain.error())  # expected: not logged as an error
            response = JSONResponse(body, status_code=status, headers={"Connection": "close", "Retry-After": "1"})
            await response(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1
