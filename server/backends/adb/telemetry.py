"""A phone's health, polled beside its supervisor: temperature and thermal status, battery, the decode
rate it measures, and whether it is *drained* (gets no new requests) because it is too hot or its
battery too low.

Every ``settings.telemetry_poll_s`` seconds (with a little jitter, so phones do not poll in step) one
short adb shell command runs ``dumpsys thermalservice`` (falling back to the kernel's thermal zones
where that service is missing) and ``dumpsys battery``; dumpsys.py parses them. The poll has its own
adb stream and task and only stores what it read: nothing on a request's path waits for it, and a
poll that fails (a timeout, the phone gone) keeps the last reading and notes the error.

Draining (:class:`DrainPolicy`, with ``thermal_routing on``): a phone at thermal status
``thermal_drain_status`` (SEVERE) or above gets no new requests until it is back at
``thermal_resume_status`` (MODERATE) or below; one below ``battery_floor_pct`` that is not charging,
until it charges or is back at ``battery_resume_pct``. Requests it runs finish. Each change is logged
once and shows as ``drained`` in its health (/v1/devices); the routing policy
(server/scheduling/routing.py, ``ThermalAware``) reads it from :attr:`PhoneTelemetry.condition`. An
unknown value (not read yet, a phone that does not say) changes nothing.

Decode rate (:class:`DecodeRate`): tokens per second of decoding over the requests that finished in
the last ``decode_rate_window_s`` seconds (None when there were none), so that throttling shows up.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from adbutils.errors import AdbError

from server.backends.adb.dumpsys import (
    BatteryReading,
    ThermalReading,
    ThermalStatus,
    parse_battery,
    parse_thermal_zones,
    parse_thermalservice,
)
from server.backends.adb.transport import AdbServerClient, run_shell
from server.backends.base import PhoneCondition, PhoneHealth
from server.errors import PhoneLost, QhxError
from server.settings import Settings

logger = logging.getLogger(__name__)

ZONES_MARK = "@@qhx-thermal-zones@@"
BATTERY_MARK = "@@qhx-battery@@"
OUTPUT_MAX = 256 * 1024  # bytes of one poll's output (a real one is a few KB): a broken phone cannot flood us
# one round trip: the thermal service (or, where it is missing, every thermal zone's type and
# temperature), then the battery; mksh and toybox on the phone, any POSIX sh on a simulated one
COMMAND = (
    f'{{ t=$(dumpsys thermalservice 2>&1 | head -c {OUTPUT_MAX // 2}); echo "$t"; '
    f"case \"$t\" in *'Thermal Status'*) ;; *) echo '{ZONES_MARK}'; "
    'for z in /sys/class/thermal/thermal_zone*; do echo "$(cat $z/type 2>/dev/null) $(cat $z/temp 2>/dev/null)"; '
    f"done;; esac; echo '{BATTERY_MARK}'; dumpsys battery 2>&1; }} | head -c {OUTPUT_MAX}"
)
JITTER = 0.1  # a poll waits the interval give or take this share
# its own generator: the global one is the application's (and a test's seeded one, hypothesis's), not ours
_JITTER_RNG = random.Random()
RATE_SAMPLES = 256  # requests kept for the decode rate at most


@dataclass(frozen=True, slots=True)
class HealthReading:
    """One poll's worth: what the phone said about its temperature and battery."""

    thermal: ThermalReading
    battery: BatteryReading


def parse_health(text: str) -> HealthReading:
    """The output of :data:`COMMAND` -> a reading (never raises)."""
    thermal_text, _, battery_text = text.partition(BATTERY_MARK)
    service_text, zones, zones_text = thermal_text.partition(ZONES_MARK)
    thermal = parse_thermalservice(service_text)
    if zones:
        fallback = parse_thermal_zones(zones_text)
        if fallback.sensors:
            thermal = fallback
    return HealthReading(thermal, parse_battery(battery_text))


async def read_health(client: AdbServerClient, serial: str, timeout: float) -> HealthReading:
    """Run :data:`COMMAND` on the phone; raises ``QhxError`` (PhoneLost) when adb fails or times out,
    or the stream ends before the command did (an unplug ends it cleanly: what arrived is part of an
    answer, not a reading)."""
    result = await run_shell(client, serial, COMMAND, timeout=timeout)
    if result.exit_code is None:
        raise PhoneLost(f"{serial}: the health poll was cut short (adb stream ended before the command)")
    return parse_health(result.stdout.decode("utf-8", errors="replace"))


class DecodeRate:
    """Decode tokens per second over the requests that finished in the last ``window_s`` seconds."""

    def __init__(self, window_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._samples: collections.deque[tuple[float, int, float]] = collections.deque(maxlen=RATE_SAMPLES)

    def add(self, tokens: int, decode_ms: float) -> None:
        if tokens > 0 and decode_ms > 0:
            self._samples.append((self._clock(), tokens, decode_ms / 1000.0))

    def tps(self) -> float | None:
        since = self._clock() - self.window_s
        while self._samples and self._samples[0][0] < since:
            self._samples.popleft()
        seconds = sum(s for _, _, s in self._samples)
        return round(sum(t for _, t, _ in self._samples) / seconds, 2) if seconds > 0 else None


class DrainPolicy:
    """Whether a phone gets new requests, from its thermal status and battery (see the module
    docstring); logs each change once. ``enabled`` False (``thermal_routing off``): never drains."""

    def __init__(self, settings: Settings, name: str, *, enabled: bool = True) -> None:
        self._name = name
        self.enabled = enabled
        self.hot = False
        self.low = False
        # the resume thresholds always leave a gap (hysteresis): lowering the drain status or raising
        # the floor alone moves them along, rather than making one setting alone invalid
        self.drain_status = settings.thermal_drain_status
        self.resume_status = min(settings.thermal_resume_status, settings.thermal_drain_status - 1)
        self.floor_pct = settings.battery_floor_pct
        self.resume_pct = max(settings.battery_resume_pct, settings.battery_floor_pct)

    @property
    def reason(self) -> str | None:
        """``thermal``, ``battery`` or None (it gets new requests)."""
        return "thermal" if self.hot else "battery" if self.low else None

    def update(self, reading: HealthReading) -> bool:
        """Take in a reading; whether ``reason`` changed."""
        if not self.enabled:
            return False
        before = self.reason
        self._thermal(reading.thermal)
        self._battery(reading.battery)
        return self.reason != before

    def _thermal(self, thermal: ThermalReading) -> None:
        status = thermal.status
        if status is None:
            return
        temp = _celsius(thermal.temperature_c)
        if not self.hot and status >= self.drain_status:
            self.hot = True
            logger.warning("%s: thermal status %s%s: no new requests until it is back at %s or below",
                           self._name, status.name, temp, ThermalStatus(self.resume_status).name)
        elif self.hot and status <= self.resume_status:
            self.hot = False
            logger.warning("%s: thermal status %s%s: takes new requests again", self._name, status.name, temp)

    def _battery(self, battery: BatteryReading) -> None:
        level, charging = battery.level_pct, battery.charging
        if not self.low and level is not None and level < self.floor_pct and charging is False:
            self.low = True
            logger.warning("%s: battery %.0f %% and not charging (floor %.0f %%): no new requests until it "
                           "charges or is back at %.0f %%", self._name, level, self.floor_pct, self.resume_pct)
        elif self.low and (charging or (level is not None and level >= self.resume_pct)):
            self.low = False
            logger.warning("%s: battery %s%s: takes new requests again", self._name,
                           "?" if level is None else f"{level:.0f} %", ", charging" if charging else "")


def _celsius(value: float | None) -> str:
    return "" if value is None else f" ({value:.1f} °C)"


class PhoneTelemetry:
    """The health of one phone: polled readings, its drain decision and its decode rate. ``on_change``
    is called (on the event loop) when what routing weighs (:attr:`condition`: thermal status,
    temperature, the drain decision) changes, so that the pool routes again."""

    def __init__(self, client: AdbServerClient, serial: str, settings: Settings, *, name: str,
                 on_change: Callable[[], None] | None = None) -> None:
        self._client = client
        self._serial = serial
        self._settings = settings
        self._name = name
        self._on_change = on_change
        self.policy = DrainPolicy(settings, name, enabled=settings.thermal_routing == "on")
        self.rate = DecodeRate(settings.decode_rate_window_s)
        self.reading: HealthReading | None = None
        self.read_at: float | None = None  # time.monotonic() of the last reading
        self.error: str | None = None  # why the last poll failed (None: it did not)
        self.condition = PhoneCondition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Poll now, then every ``telemetry_poll_s`` (0: never), until :meth:`stop`."""
        if self._settings.telemetry_poll_s > 0 and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._poll_forever(), name=f"qhx-telemetry-{self._name}")

    async def stop(self) -> None:
        """Stop polling and forget what was read and measured: a phone not polled (unplugged, its adb
        server gone) would show a reading growing stale as current (/metrics gauges, ``drained``);
        when it is started again, its first poll reads it afresh (and drains it again if it must)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.reading = self.read_at = self.error = None
        self.policy = DrainPolicy(self._settings, self._name, enabled=self.policy.enabled)
        self.rate = DecodeRate(self._settings.decode_rate_window_s)
        self.condition = PhoneCondition()

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll()
            except Exception:  # this task alone un-drains the phone: it must outlive any one poll
                logger.exception("%s: health poll failed unexpectedly; polling on", self._name)
            interval = self._settings.telemetry_poll_s
            await asyncio.sleep(interval * _JITTER_RNG.uniform(1 - JITTER, 1 + JITTER))

    async def poll(self) -> None:
        """One reading now (a failure is noted, never raised)."""
        try:
            reading = await read_health(self._client, self._serial, self._settings.adb_timeout_s)
        except (QhxError, AdbError, OSError, TimeoutError) as e:
            if self.error is None:
                logger.info("%s: health poll failed (%s); keeping the last reading", self._name, e)
            self.error = str(e)
            return
        self.take(reading)

    def take(self, reading: HealthReading) -> None:
        """A new reading: stored, weighed by the drain policy, passed on to routing. The pool hears of
        every change of what routing weighs, not only of the drain decision: a phone that cools below
        another changes which free phone a waiting request would take, and a request that chose to
        wait for a busy phone beside it must be routed again now, not at its deadline."""
        self.reading, self.read_at, self.error = reading, time.monotonic(), None
        self.policy.update(reading)
        before, self.condition = self.condition, PhoneCondition(
            thermal_status=int(reading.thermal.status) if reading.thermal.status is not None else None,
            temperature_c=reading.thermal.temperature_c,
            drained=self.policy.reason,
        )
        if self.condition != before and self._on_change is not None:
            self._on_change()

    def fill(self, health: PhoneHealth) -> None:
        """Write what it knows into the phone's health (the /v1/devices row)."""
        health.decode_tps = self.rate.tps()
        health.drained = self.condition.drained
        health.telemetry_error = self.error
        reading = self.reading
        if reading is None or self.read_at is None:
            return
        health.telemetry_age_s = round(time.monotonic() - self.read_at, 1)
        fill_reading(health, reading)


def fill_reading(health: PhoneHealth, reading: HealthReading) -> None:
    """A reading's temperatures and battery, into a /v1/devices row."""
    status = reading.thermal.status
    health.thermal_status = int(status) if status is not None else None
    health.temperature_c = reading.thermal.temperature_c
    health.battery_level = reading.battery.level_pct
    health.charging = reading.battery.charging
    health.battery_temperature_c = reading.battery.temperature_c
