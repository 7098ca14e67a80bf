"""GET /v1/devices/events: the farm's live state as server-sent events (docs/api.md).

One ``data: {"object": "devices.snapshot", ...}`` event at once, then one per change
(server/api/devices_watch.py), ``: ping`` comments every ``Settings.sse_ping_s`` in between. Behind the
API key like every ``/v1`` route (browsers: read it with ``fetch`` and an ``Authorization`` header,
never a key in the URL). It ends when the server starts shutting down (a watch has nothing in flight
to wait for: an open console must not hold the shutdown up).

A watcher that stops reading (a laptop gone to sleep with the console open) holds little and not for
long: the stream's buffers are bounded as a generation stream's (server/api/connection.py: without it
the kernel kept megabytes of snapshots for it), a send that waits ``Settings.write_timeout_s`` drops
the connection, and so does the shutdown: a stream stuck in a send never gets to end by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.types import Receive, Scope, Send

from server.api.connection import abort_connection, bound_stream_buffers
from server.api.devices_watch import DeviceWatch
from server.api.shutdown import Drain

logger = logging.getLogger(__name__)
router = APIRouter()

END_S = 2.0  # once the server shuts down, a stream that has not ended by itself this long after is dropped


@router.get("/v1/devices/events")
async def device_events(request: Request) -> EventSourceResponse:
    watch: DeviceWatch = request.app.state.device_watch
    drain = getattr(request.app.state, "drain", None)  # shutting down: the stream ends (server/api/shutdown.py)

    def shutting_down() -> bool:
        return drain is not None and bool(drain.draining)

    async def events() -> AsyncIterator[bytes]:
        async for snapshot in watch.snapshots(until=shutting_down):
            yield b"data: " + watch.encode(snapshot) + b"\n\n"

    settings = request.app.state.settings
    return _WatchStream(
        events(), drain=drain, check_s=watch.tick_s, ping=settings.sse_ping_s, sep="\n",
        headers={"Cache-Control": "no-store"},
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
        send_timeout=settings.write_timeout_s,
    )


class _WatchStream(EventSourceResponse):
    """sse-starlette's response, with bounded buffers, dropped when a send times out or when the
    server shuts down and the stream does not end by itself (the module docstring)."""

    def __init__(self, *args: Any, drain: Drain | None, check_s: float, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.drain = drain
        self.check_s = check_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        bound_stream_buffers(scope)
        stream = asyncio.ensure_future(super().__call__(scope, receive, send))
        try:
            while not stream.done():
                await asyncio.wait({stream}, timeout=self.check_s)
                if stream.done() or self.drain is None or not self.drain.draining:
                    continue
                # the snapshots end at the watch's next tick; a send to a client that stopped reading does not
                await asyncio.wait({stream}, timeout=END_S)
                if not stream.done():
                    logger.info("device events: the server shuts down and the client takes no data: dropped")
                    await abort_connection(scope)
                    await asyncio.wait({stream}, timeout=END_S)
                break
            if stream.done():
                stream.result()
        except SendTimeoutError:
            await abort_connection(scope)
            logger.info("device events: the client took no data for %.0f s (write_timeout_s): dropped",
                        self.send_timeout)
        finally:
            if not stream.done():
                stream.cancel()
                await asyncio.wait({stream})
