"""All phones of all adb servers, tracked live.

Every ``settings.device_poll_s`` seconds each adb server is asked for its device list (adbutils, in a
worker thread, short socket timeout). A serial seen in state ``device`` gets a :class:`Phone` (started:
discovery, session); a phone that disappears, turns ``offline``/``unauthorized``, or whose adb server
stops answering is stopped and shown OFFLINE (kept in ``phones`` with its counters, restarted when it
comes back). A phone that cannot serve (INCOMPATIBLE: no bundle, wrong SoC) is discovered again every
``settings.recheck_incompatible_s``, so that a bundle provisioned meanwhile is served without a restart.
Phones are keyed ``"<adb_server>/<serial>"`` since two servers may see the same serial.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from adbutils.errors import AdbError

from server.backends.adb.phone import Phone
from server.backends.adb.transport import AdbServerClient, format_server, list_devices, resolve_adb_servers
from server.backends.base import PhoneHealth, PhoneState
from server.settings import Settings

__all__ = ["AdbFleet", "resolve_adb_servers"]

logger = logging.getLogger(__name__)


class AdbFleet:
    """Discovery over one or more adb servers; owns one Phone per (server, serial)."""

    def __init__(self, settings: Settings, *, on_change: Callable[[Phone], None] | None = None) -> None:
        self.settings = settings
        self.on_change = on_change
        self.servers: list[str] = [format_server(h, p) for h, p in resolve_adb_servers(settings)]
        self.phones: dict[str, Phone] = {}
        self._clients = {s: AdbServerClient(s, timeout=settings.adb_timeout_s) for s in self.servers}
        self._reachable: dict[str, bool] = {}
        self._poller: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Poll once (phones known when this returns; their sessions start in the background), then
        keep polling."""
        logger.info("adb servers: %s", ", ".join(self.servers))
        await self.refresh()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_forever(), name="qhx-adb-fleet")

    async def aclose(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            poller.cancel()
            try:
                await poller
            except asyncio.CancelledError:
                pass
        await asyncio.gather(*(p.aclose() for p in self.phones.values()), return_exceptions=True)

    async def refresh(self) -> None:
        """One poll of every adb server now."""
        async with self._lock:
            await asyncio.gather(*(self._poll(server) for server in self.servers))

    async def wait_for(
        self, predicate: Callable[[AdbFleet], bool], timeout: float, interval: float = 0.05
    ) -> bool:
        """Wait until predicate(fleet) holds (True) or timeout passes (False)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(self):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(interval)
        return True

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.device_poll_s)
            try:
                await self.refresh()
            except Exception:  # keep tracking whatever one bad poll did
                logger.exception("device poll failed")

    async def _poll(self, server: str) -> None:
        client = self._clients[server]
        try:
            async with asyncio.timeout(self.settings.adb_timeout_s + 1):
                devices = await list_devices(client)
        except (AdbError, OSError, TimeoutError) as e:
            if self._reachable.get(server, True):
                logger.warning("adb server %s unreachable (%s); will keep trying", server, e)
            self._reachable[server] = False
            await self._stop_all(server, f"adb server {server} unreachable")
            return
        if not self._reachable.get(server, True):
            logger.info("adb server %s is back", server)
        self._reachable[server] = True

        for serial, adb_state in devices.items():
            key = f"{server}/{serial}"
            phone = self.phones.get(key)
            if adb_state == "device":
                if phone is None:
                    logger.info("new phone %s", key)
                    phone = Phone(serial, server, self.settings, client=client, on_change=self.on_change)
                    self.phones[key] = phone
                if phone.state is PhoneState.OFFLINE or (
                    phone.state is PhoneState.INCOMPATIBLE
                    and time.monotonic() - phone.state_since >= self.settings.recheck_incompatible_s
                ):
                    await phone.start()
            elif phone is not None and phone.state is not PhoneState.OFFLINE:
                hint = " (accept the debugging prompt on the phone)" if adb_state == "unauthorized" else ""
                await phone.stop(f"adb reports {adb_state}{hint}", graceful=False)
        for key, phone in list(self.phones.items()):
            if (
                phone.adb_server == server
                and phone.serial not in devices
                and phone.state is not PhoneState.OFFLINE
            ):
                await phone.stop("disconnected from adb", graceful=False)

    async def _stop_all(self, server: str, reason: str) -> None:
        for phone in self.phones.values():
            if phone.adb_server == server and phone.state is not PhoneState.OFFLINE:
                await phone.stop(reason, graceful=False)

    # ------------------------------------------------------------------ views

    def health(self) -> list[PhoneHealth]:
        return [h for phone in self.phones.values() for h in phone.health()]
