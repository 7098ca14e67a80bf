"""Parsers of what a phone says about its health: ``dumpsys thermalservice``, ``dumpsys battery`` and,
where the thermal service is missing or refused (Android 9 and older, restricted builds), the kernel's
thermal zones. Pure functions of text: no adb here (telemetry.py runs the commands).

Formats differ across Android versions and vendors (/work/shared/reference/android-health.md and the
samples in tests/backends/adb/test_dumpsys.py), so every parser is lenient: lines it does not know are
ignored, a value it cannot read is ``None`` (unknown), and no input makes it raise.

``dumpsys thermalservice`` (Android 10+, ThermalManagerService.dumpInternal)::

    IsStatusOverride: false
    ThermalEventListeners: ...
    Thermal Status: 3
    Cached temperatures:
    \tTemperature{mValue=44.3, mType=3, mName=skin, mStatus=3}
    HAL Ready: true
    HAL connection: ...
    Current temperatures from HAL:
    \tTemperature{mValue=44.3, mType=3, mName=skin, mStatus=3}
    Current cooling devices from HAL:
    \tCoolingDevice{mValue=0, mType=2, mName=thermal-cpufreq-0}
    Temperature static thresholds from HAL:
    \tTemperatureThreshold{mType=3, mName=skin, mHotThrottlingThresholds=[NaN, 38.0, ...], ...}

The HAL's current temperatures win over the cached ones (the cache holds the last *throttling event*
per sensor, which may be old); a sensor that reads 0.0 (or NaN) is one the phone does not have.

``dumpsys battery`` (BatteryService)::

    Current Battery Service state:
      (UPDATES STOPPED -- use 'reset' to restart)      <- after `dumpsys battery set/unplug`
      AC powered: false
      USB powered: true
      status: 2                                       <- 1 unknown, 2 charging, 3 discharging,
      level: 84                                          4 not charging, 5 full
      scale: 100
      temperature: 326                                <- tenths of a degree C
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass


class ThermalStatus(enum.IntEnum):
    """PowerManager's thermal status levels (android.os.PowerManager.THERMAL_STATUS_*)."""

    NONE = 0
    LIGHT = 1
    MODERATE = 2
    SEVERE = 3
    CRITICAL = 4
    EMERGENCY = 5
    SHUTDOWN = 6


# android.os.Temperature.TYPE_*; the sensors whose reading stands for "the phone's temperature",
# best first: skin is what Android's thermal status follows, the battery what a hand feels next
TYPE_NAMES = {0: "cpu", 1: "gpu", 2: "battery", 3: "skin", 4: "usb_port", 5: "power_amplifier",
              6: "bcl_voltage", 7: "bcl_current", 8: "bcl_percentage", 9: "npu", 10: "tpu", 11: "display",
              12: "modem", 13: "soc", 14: "wifi", 15: "camera", 16: "flashlight", 17: "speaker",
              18: "ambient", 19: "pogo"}
_TEMPERATURE_TYPES = frozenset({0, 1, 2, 3, 4, 5, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19})  # not BCL_*
MIN_C, MAX_C = -40.0, 150.0  # a reading outside is not a temperature (an absent sensor, a raw ADC value)

BATTERY_STATUS = {1: "unknown", 2: "charging", 3: "discharging", 4: "not charging", 5: "full"}

# Parsing runs on the event loop, so it must stay linear in the output (up to telemetry.OUTPUT_MAX):
# lines are split with str methods, and the only patterns left cannot backtrack more than a line's
# length once (a `key: value` pattern with lazy groups between `\s*` was cubic on a blank line)
_STATUS_KEY = "Thermal Status:"
_TEMPERATURE_OPEN = "Temperature{"
_FIELD = re.compile(r"(?:^|,\s*)(m[A-Z]\w*)=")
_SECTION_HAL = "Current temperatures from HAL:"
_SECTION_CACHED = "Cached temperatures:"
_INT = re.compile(r"-?[0-9]{1,12}")
_DECIMAL_COMMA = re.compile(r"-?[0-9]{1,6},[0-9]{1,6}")


@dataclass(frozen=True, slots=True)
class Sensor:
    """One ``Temperature{...}`` line (or one thermal zone)."""

    name: str
    type: int | None  # android.os.Temperature.TYPE_*; None for a kernel thermal zone
    celsius: float
    status: int | None = None  # the sensor's own throttling level (mStatus)


@dataclass(frozen=True, slots=True)
class ThermalReading:
    """What ``dumpsys thermalservice`` (or the thermal zones) said; ``None`` fields are unknown."""

    status: ThermalStatus | None = None
    sensors: tuple[Sensor, ...] = ()
    error: str | None = None  # why nothing could be read (service missing, permission denied)

    @property
    def temperature_c(self) -> float | None:
        """The phone's temperature: its skin sensor (the hottest, when several), else the battery, else
        the hottest sensor there is."""
        sensor = self.sensor
        return sensor.celsius if sensor is not None else None

    @property
    def sensor(self) -> Sensor | None:
        """The sensor ``temperature_c`` is read from."""
        for wanted in (3, 2):
            of_type = [s for s in self.sensors if s.type == wanted]
            if of_type:
                return max(of_type, key=lambda s: s.celsius)
        for hint in ("skin", "batt"):  # thermal zones have names, not types
            named = [s for s in self.sensors if s.type is None and hint in s.name.lower()]
            if named:
                return max(named, key=lambda s: s.celsius)
        return max(self.sensors, key=lambda s: s.celsius, default=None)


@dataclass(frozen=True, slots=True)
class BatteryReading:
    """What ``dumpsys battery`` said; ``None`` fields are unknown."""

    level_pct: float | None = None  # level / scale, in percent
    status: int | None = None  # BATTERY_STATUS
    plugged: bool | None = None  # AC, USB, wireless or dock powered
    temperature_c: float | None = None
    voltage_mv: int | None = None
    health: int | None = None
    updates_stopped: bool = False  # someone ran `dumpsys battery set/unplug`: the values are made up
    error: str | None = None

    @property
    def charging(self) -> bool | None:
        """Charging (status 2), or plugged in and full (5); None when the phone said neither status nor
        power source."""
        if self.status in (2, 5):
            return True
        if self.status in (3, 4):
            return False
        return self.plugged


def parse_thermalservice(text: str) -> ThermalReading:
    """``dumpsys thermalservice`` output -> :class:`ThermalReading` (never raises)."""
    status = None
    for line in text.splitlines():
        line = line.strip()
        number = _int(line[len(_STATUS_KEY):]) if line.startswith(_STATUS_KEY) else None
        if number is not None:  # the first "Thermal Status: N" line
            status = ThermalStatus(number) if 0 <= number <= ThermalStatus.SHUTDOWN else None
            break
    hal = _section(text, _SECTION_HAL)
    sensors = _sensors(hal) if hal is not None else ()
    if not sensors:
        cached = _section(text, _SECTION_CACHED)
        sensors = _sensors(cached) if cached is not None else ()
    if not sensors and hal is None:
        sensors = _sensors(text.splitlines())  # no section headers at all: any Temperature{...} line
    error = None
    if status is None and not sensors:
        error = _first_line(text) or "empty output"
    return ThermalReading(status, sensors, error)


def parse_thermal_zones(text: str) -> ThermalReading:
    """Lines ``<type> <temp>`` (the kernel's ``/sys/class/thermal/thermal_zone*/{type,temp}``) -> the
    sensors; no thermal status (the kernel does not have Android's). Temperatures come in millidegrees
    on most kernels, in degrees or tenths on some: the unit is guessed from the magnitude."""
    sensors = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        name, raw = parts
        try:
            value = float(raw)
        except ValueError:
            continue
        celsius = value / 1000 if abs(value) >= 1000 else value / 10 if abs(value) >= 200 else value
        if _plausible(celsius):
            sensors.append(Sensor(name, None, round(celsius, 3)))
    return ThermalReading(None, tuple(sensors), None if sensors else "no readable thermal zone")


def parse_battery(text: str) -> BatteryReading:
    """``dumpsys battery`` output -> :class:`BatteryReading` (never raises)."""
    values: dict[str, str] = {}
    stopped = False
    for line in text.splitlines():
        if "UPDATES STOPPED" in line:
            stopped = True
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if colon and key and value:
            values.setdefault(key, value)  # the first wins (Samsung repeats keys)
    level, scale = _int(values.get("level")), _int(values.get("scale"))
    level_pct = None
    if level is not None and 0 <= level:
        pct = level * 100 / scale if scale is not None and scale > 0 else float(level)
        level_pct = round(pct, 1) if 0 <= pct <= 100 else None
    powered = [_bool(values.get(f"{source} powered")) for source in ("AC", "USB", "Wireless", "Dock")]
    known = [p for p in powered if p is not None]
    tenths = _int(values.get("temperature"))
    temperature = tenths / 10 if tenths is not None and _plausible(tenths / 10) else None
    status = _int(values.get("status"))
    reading = BatteryReading(
        level_pct=level_pct,
        status=status if status in BATTERY_STATUS else None,
        plugged=any(known) if known else None,
        temperature_c=temperature,
        voltage_mv=_int(values.get("voltage")),
        health=_int(values.get("health")),
        updates_stopped=stopped,
    )
    if reading.level_pct is None and reading.status is None and reading.plugged is None:
        return BatteryReading(error=_first_line(text) or "empty output")
    return reading


def _section(text: str, header: str) -> list[str] | None:
    """The lines after ``header`` up to the next unindented line (None: no such header)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == header:
            body = []
            for nxt in lines[i + 1:]:
                if nxt and not nxt[0].isspace() and not nxt.startswith("Temperature{"):
                    break
                body.append(nxt)
            return body
    return None


def _sensors(lines: list[str]) -> tuple[Sensor, ...]:
    sensors: dict[str, Sensor] = {}
    for line in lines:
        body = _temperature_body(line)
        if body is None:
            continue
        fields = _fields(body)
        value, name = _float(fields.get("mValue")), fields.get("mName")
        if value is None or not name or not _plausible(value) or value == 0.0:
            continue  # an absent sensor reads 0.0 or NaN
        kind = _int(fields.get("mType"))
        if kind is not None and kind not in _TEMPERATURE_TYPES:
            continue  # BCL_* are a voltage, a current, a percentage
        sensors.setdefault(name, Sensor(name, kind, value, _int(fields.get("mStatus"))))
    return tuple(sensors.values())


def _temperature_body(line: str) -> str | None:
    """What is between ``Temperature{`` (not the end of a longer word: ``CoolingTemperature{``) and
    the line's last ``}``; None when the line has no such thing."""
    start = line.find(_TEMPERATURE_OPEN)
    while start > 0 and line[start - 1].isalpha():
        start = line.find(_TEMPERATURE_OPEN, start + 1)
    if start < 0:
        return None
    start += len(_TEMPERATURE_OPEN)
    end = line.rfind("}")
    return line[start:end] if end >= start else None


def _fields(body: str) -> dict[str, str]:
    """``mValue=1.0, mType=3, mName=a, b, mStatus=0`` -> {mValue: 1.0, ...}: split at ``, m<Upper>=``
    only, so that a vendor's name with a comma in it stays whole."""
    marks = list(_FIELD.finditer(body))
    out = {}
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(body)
        out[mark.group(1)] = body[mark.end():end].strip()
    return out


def _plausible(celsius: float) -> bool:
    return math.isfinite(celsius) and MIN_C <= celsius <= MAX_C


def _float(text: str | None) -> float | None:
    if text is not None and _DECIMAL_COMMA.fullmatch(text.strip()):
        text = text.replace(",", ".")  # a vendor HAL that formats for its locale: 44,3
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if _INT.fullmatch(text) else None


def _bool(text: str | None) -> bool | None:
    return {"true": True, "false": False}.get((text or "").strip().lower())


def _first_line(text: str) -> str:
    return next((line.strip()[:200] for line in text.splitlines() if line.strip()), "")
