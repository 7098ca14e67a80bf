"""`qhx-server serve`: pick the phones (real, or simulated when none is attached), then run uvicorn."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Iterator

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


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(settings: Settings) -> int:
    import uvicorn

    from server.api.app import create_app
    from server.logs import configure_logging

    configure_logging(settings)
    # uvicorn re-raises SIGTERM with the handler it found once it has shut down; make that handler
    # unwind the stack so the simulated phones and their private adb server are stopped too.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    with simulated_phones(settings) as effective:
        app = create_app(effective)
        # log_config=None: uvicorn's lines go through our handler (format, request id); our access
        # line (server/api/access.py) replaces uvicorn's
        uvicorn.run(app, host=effective.host, port=effective.port, log_level=effective.log_level.lower(),
                    log_config=None, access_log=False)
    return 0
