"""`qhx-server serve`: pick the phones (real, or simulated when none is attached), then run uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import signal
import socket
from collections.abc import Callable, Iterator
from types import FrameType

import uvicorn
from sse_starlette.sse import AppStatus

from server.api.shutdown import Drain
from server.settings import Settings

logger = logging.getLogger(__name__)


def _reachable_servers(settings: Settings) -> list[tuple[str, int]]:
    from server.backends.adb.transport import resolve_adb_servers

    found = []
    for host, port in resolve_adb_servers(settings):
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            found.append((host, port))
    return found


def _real_phone_attached(settings: Settings) -> bool:
    """True when a reachable adb server lists at least one device. Does not start an adb server:
    with none running there can be no phone to serve."""
    import adbutils

    for host, port in _reachable_servers(settings):
        try:
            if any(d.state == "device" for d in adbutils.AdbClient(host=host, port=port, socket_timeout=3).list()):
                return True
        except adbutils.AdbError:
            continue
    return False


@contextlib.contextmanager
def simulated_phones(settings: Settings) -> Iterator[Settings]:
    """Start simulated phones when asked (or, with sim=-1, when no adb server is named and no phone
    is attached) and yield the settings pointing at their private adb server."""
    count = settings.sim
    if count < 0 and settings.adb_servers:  # named adb servers are polled until their phones come,
        count = 0  # never replaced by a simulated phone because they were down at start-up
    elif count < 0:
        count = 0 if _real_phone_attached(settings) else 1
        if count:
            logger.warning("no phone attached to any reachable adb server: serving from ONE SIMULATED phone")
    if count == 0:
        yield settings
        return
    from server.sim.harness import SimLab

    lab = SimLab(count, precision=settings.sim_precision, speed=settings.sim_speed)
    with lab:
        logger.warning(
            "SIMULATED PHONES: %d simulated phone(s) on private adb server %s; tokens are simulated, "
            "not the model's", count, lab.adb_server,
        )
        yield settings.model_copy(update={"adb_servers": [lab.adb_server]})


class _Server(uvicorn.Server):
    """uvicorn with our shutdown (server/api/shutdown.py, docs/reliability.md):

    * the first SIGTERM or SIGINT begins the app's drain: uvicorn stops accepting and waits for the
      connections, the drain lets requests run ``shutdown_grace_s`` and then cancels the rest;
    * a second one expires the drain at once: what still runs is cancelled on its phone now (each
      request ends with its error), and the shutdown goes on as before, the pool closing every
      phone's session;
    * a third exits without waiting for anything (uvicorn's force exit);
    * the signal is not raised again once uvicorn is done: a shutdown that went as planned exits 0
      and unwinds the stack, the simulated phones and their adb server included.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self._drain = drain
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._signals += 1
        name = signal.Signals(sig).name
        if self._signals == 1:
            self.should_exit = True
            self._call(logger.warning, "%s: shutting down (grace %.0f s; again to cancel what still runs now)",
                       name, self._drain.grace_s)
            self._call(self._drain.begin)
        elif self._signals == 2:
            self._call(logger.warning, "%s again: cancelling every request still running", name)
            self._call(self._drain.expire)
        else:
            self.force_exit = True
            self._call(logger.warning, "%s a third time: exiting without waiting", name)

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        """``fn(*args)`` on the loop, outside any request: a signal interrupts whatever runs, and its
        context (the request id on log lines) is not the shutdown's."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args, context=contextvars.Context())


def serve(settings: Settings) -> int:
    from server.api.app import create_app
    from server.logs import configure_logging

    configure_logging(settings)
    # sse-starlette ends every stream at once on uvicorn's first signal; the drain does it instead,
    # after the grace period and with an error event
    AppStatus.disable_automatic_graceful_drain()
    # SIGTERM before uvicorn takes the signals over (or after it gave them back) unwinds the stack,
    # so that the simulated phones and their private adb server are stopped too
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with simulated_phones(settings) as effective:
        app = create_app(effective)
        # log_config=None: uvicorn's lines go through our handler (format, request id); our access
        # line (server/api/access.py) replaces uvicorn's. The graceful timeout is uvicorn's backstop:
        # the drain has ended every request by then (phone clean-ups are bounded by cancel_timeout_s).
        config = uvicorn.Config(app, host=effective.host, port=effective.port, log_level=effective.log_level.lower(),
                                log_config=None, access_log=False,
                                timeout_graceful_shutdown=math.ceil(effective.shutdown_grace_s + effective.cancel_timeout_s) + 5)
        _Server(config, app.state.drain).run()
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
