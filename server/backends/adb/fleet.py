"""All phones of all adb servers, tracked live.

Every ``settings.device_poll_s`` seconds each adb server is asked for its device list (adbutils, in a
worker thread, short socket timeout). A serial seen in state ``device`` gets a :class:`Phone` (started:
discovery, session); a phone that disappears, turns ``offline``/``unauthorized``, or whose adb server
stops answering is stopped and shown OFFLINE (kept in ``phones`` with its counters, restarted when it
comes back). A phone that cannot serve (INCOMPATIBLE: no bundle, wrong SoC) is discovered again every
``settings.recheck_incompatible_s``, so that a bundle provisioned meanwhile is served without a restart.
Phones are keyed ``"<adb_server>/<serial>"`` since two servers may see the same serial.

adb server restarts. Besides polling, the fleet holds one ``host:track-devices`` connection to each adb
server: the server sends on it whenever a device comes, goes or changes state (the fleet then polls at
once), and it ends when the server stops. That is how a server killed and started again between two
polls (by systemd, by another adb client of another version, by the simulated phones' lab) is noticed:
its phones are stopped at once (OFFLINE: ``/ready`` says so) and started afresh once it lists them
again, without counting the lost sessions against the phones (a dead adb server is not the phones'
fault, and counting it would quarantine every phone after two restarts). A restarted adb server knows
no phone reached over TCP (``adb connect``); the fleet connects again those it was serving, and keeps
trying those it cannot reach yet (backoff up to ``RECONNECT_MAX_S``, one warning per phone) until the
adb server lists them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from adbutils.errors import AdbError

from server.backends.adb.phone import Phone
from server.backends.adb.transport import (
    AdbServerClient,
    connect_device,
    format_server,
    list_devices,
    open_tracker,
    resolve_adb_servers,
)
from server.backends.base import PhoneHealth, PhoneState
from server.settings import Settings

__all__ = ["AdbFleet", "resolve_adb_servers"]

logger = logging.getLogger(__name__)

# a phone reached over TCP (``adb connect host:port``): what a restarted adb server must be told again
_TCP_SERIAL = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):\d{1,5}")
RECONNECT_MAX_S = 60.0  # the longest wait between two ``adb connect`` of a TCP phone the adb server forgot


@dataclass(slots=True)
class _Reconnect:
    """A TCP phone to ``adb connect`` again: attempts so far, when to try next."""

    attempts: int = 0
    next_at: float = 0.0


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
        self._trackers: list[asyncio.Task[None]] = []
        self._reconnector: asyncio.Task[None] | None = None
        # per adb server: TCP phones it served when it went away, until it lists them again
        self._reconnect: dict[str, dict[str, _Reconnect]] = {s: {} for s in self.servers}
        self._reconnect_now = asyncio.Event()
        self._tracking: set[str] = set()  # adb servers whose track-devices connection is open (they are up)
        self._kick = asyncio.Event()  # poll now (a tracker saw a change), not at the next interval
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Poll once (phones known when this returns; their sessions start in the background), then
        keep polling."""
        logger.info("adb servers: %s", ", ".join(self.servers))
        await self.refresh()
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll_forever(), name="qhx-adb-fleet")
            self._trackers = [asyncio.create_task(self._track(server), name=f"qhx-adb-track-{server}")
                              for server in self.servers]
            self._reconnector = asyncio.create_task(self._reconnect_forever(), name="qhx-adb-reconnect")

    async def aclose(self) -> None:
        tasks = [t for t in (self._poller, *self._trackers, self._reconnector) if t is not None]
        self._poller, self._trackers, self._reconnector = None, [], None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.device_poll_s):
                    await self._kick.wait()
            self._kick.clear()
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
        pending = self._reconnect[server]
        for serial in [s for s in pending if s in devices]:  # listed again: the adb server has it
            del pending[serial]

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

    async def _track(self, server: str) -> None:
        """Follow one adb server's device changes; when the server stops, stop its phones at once and,
        once it is back, ``adb connect`` again the phones it served over TCP (see the module docstring)."""
        client = self._clients[server]
        while True:
            try:
                reader, writer = await open_tracker(client)
            except (AdbError, OSError):
                await asyncio.sleep(self.settings.device_poll_s)  # down: the poller says so, once
                continue
            self._tracking.add(server)
            try:
                if self._reconnect[server]:  # it is back: connect its TCP phones again now
                    for retry in self._reconnect[server].values():
                        retry.next_at = 0.0
                    self._reconnect_now.set()
                while await reader.read(4096):
                    self._kick.set()
            except (ConnectionError, OSError):
                pass
            finally:
                self._tracking.discard(server)
                writer.close()
            async with self._lock:
                serving = [p for p in self.phones.values()
                           if p.adb_server == server and p.state is not PhoneState.OFFLINE]
                if serving:
                    logger.warning("adb server %s went away (stopped or restarted); its %d phone(s) are "
                                   "offline until it lists them again", server, len(serving))
                await self._stop_all(server, f"adb server {server} went away")
            self._kick.set()
            await asyncio.sleep(0.05)  # a server that accepts and hangs up at once must not spin this loop

    async def _reconnect_forever(self) -> None:
        """``adb connect`` again, with backoff, the TCP phones that a restarted adb server forgot, until
        it lists them (see the module docstring)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.device_poll_s):
                    await self._reconnect_now.wait()
            self._reconnect_now.clear()
            now = time.monotonic()
            due = [(server, serial, r) for server, pending in self._reconnect.items()
                   if server in self._tracking for serial, r in pending.items() if r.next_at <= now]
            if due:
                await asyncio.gather(*(self._connect_again(server, serial, r) for server, serial, r in due))
                self._kick.set()

    async def _connect_again(self, server: str, serial: str, retry: _Reconnect) -> None:
        try:
            answer = (await connect_device(self._clients[server], serial)).strip()
        except (AdbError, OSError) as e:
            answer = f"{type(e).__name__}: {e}"
        retry.attempts += 1
        wait = min(self.settings.device_poll_s * 2.0**retry.attempts, RECONNECT_MAX_S)
        retry.next_at = time.monotonic() + wait
        if "connected to" in answer:  # "connected to", "already connected to"
            logger.info("adb server %s is back: adb connect %s: %s", server, serial, answer)
        elif retry.attempts == 1:
            logger.warning("adb server %s is back but cannot reach %s (adb connect: %s); trying again, at "
                           "least every %.0f s, until it does", server, serial, answer, RECONNECT_MAX_S)
        else:
            logger.debug("adb connect %s (attempt %d): %s", serial, retry.attempts, answer)

    async def _stop_all(self, server: str, reason: str) -> None:
        """The adb server went away (the tracker saw it end, or a poll found it unreachable, whichever
        came first): its phones stop, and those it reached over TCP are to be connected again."""
        for phone in self.phones.values():
            if phone.adb_server == server and phone.state is not PhoneState.OFFLINE:
                if _TCP_SERIAL.fullmatch(phone.serial):
                    self._reconnect[server].setdefault(phone.serial, _Reconnect())
                await phone.stop(reason, graceful=False)

    # ------------------------------------------------------------------ views

    def health(self) -> list[PhoneHealth]:
        return [h for phone in self.phones.values() for h in phone.health()]
