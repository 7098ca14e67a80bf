"""Parsers of phone health (server/backends/adb/dumpsys.py) over samples in the formats of several
Android versions and vendors, written from the public format (AOSP ThermalManagerService.dumpInternal
and BatteryService.dumpInternal, android.os.Temperature.toString, and outputs operators have posted),
and over malformed output: unknown lines are ignored, unknown values are None, nothing raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.backends.adb.dumpsys import (
    ThermalStatus,
    parse_battery,
    parse_thermal_zones,
    parse_thermalservice,
)
from server.backends.adb.telemetry import BATTERY_MARK, OUTPUT_MAX, ZONES_MARK, parse_health

LISTENERS = ("IsStatusOverride: false\nThermalEventListeners:\n\tcallbacks: 1\n\tkilled: false\n"
             "\tbroadcasts count: -1\nThermalStatusListeners:\n\tcallbacks: 1\n\tkilled: false\n"
             "\tbroadcasts count: -1\n")

# Android 10, a Pixel: HIDL thermal HAL 2.0; BCL sensors (a percentage) are not temperatures
ANDROID_10_PIXEL = LISTENERS + """Thermal Status: 0
Cached temperatures:
\tTemperature{mValue=28.6, mType=3, mName=skin, mStatus=0}
HAL Ready: true
HAL connection:
\tThermalHAL 2.0 connected: yes
Current temperatures from HAL:
\tTemperature{mValue=30.7, mType=2, mName=battery, mStatus=0}
\tTemperature{mValue=35.5, mType=0, mName=cpu0-silver-usr, mStatus=0}
\tTemperature{mValue=36.1, mType=0, mName=cpu4-gold-usr, mStatus=0}
\tTemperature{mValue=33.2, mType=1, mName=gpu0-usr, mStatus=0}
\tTemperature{mValue=29.4, mType=3, mName=skin, mStatus=0}
\tTemperature{mValue=29.8, mType=4, mName=usbc-therm-adc, mStatus=0}
\tTemperature{mValue=88.0, mType=8, mName=soc, mStatus=0}
Current cooling devices from HAL:
\tCoolingDevice{mValue=0, mType=2, mName=thermal-cpufreq-0}
"""

# Android 12, a Samsung Galaxy A52 (as an operator posted it): absent sensors read 0.0, three skin
# sensors (LRB/LRF/LRP), vendor names; no thresholds section yet
ANDROID_12_SAMSUNG = LISTENERS.replace("callbacks: 1", "callbacks: 4") + """Thermal Status: 0
Cached temperatures:
\tTemperature{mValue=0.0, mType=2, mName=SUBBAT, mStatus=0}
\tTemperature{mValue=25.6, mType=0, mName=AP, mStatus=0}
\tTemperature{mValue=23.8, mType=2, mName=BAT, mStatus=0}
HAL Ready: true
HAL connection:
\tThermalHAL 2.0 connected: yes
Current temperatures from HAL:
\tTemperature{mValue=25.6, mType=0, mName=AP, mStatus=0}
\tTemperature{mValue=23.8, mType=2, mName=BAT, mStatus=0}
\tTemperature{mValue=24.7, mType=3, mName=LRB, mStatus=0}
\tTemperature{mValue=24.9, mType=3, mName=LRF, mStatus=0}
\tTemperature{mValue=24.7, mType=3, mName=LRP, mStatus=0}
\tTemperature{mValue=25.7, mType=5, mName=PA, mStatus=0}
\tTemperature{mValue=0.0, mType=2, mName=SUBBAT, mStatus=0}
\tTemperature{mValue=0.0, mType=2, mName=SUBBATRAW, mStatus=0}
\tTemperature{mValue=0.0, mType=4, mName=USB, mStatus=0}
Current cooling devices from HAL:
Temperature static thresholds from HAL:
"""

# the same as pasted where indentation was lost (forums, some terminals)
ANDROID_12_SAMSUNG_FLAT = ANDROID_12_SAMSUNG.replace("\t", "")

# Android 11, a Samsung Galaxy Tab A7 Lite: HAL 1.0, a CPU sensor only
ANDROID_11_TABLET = LISTENERS + """Thermal Status: 1
Cached temperatures:
HAL Ready: true
HAL connection:
\tThermalHAL 1.0 connected: yes
Current temperatures from HAL:
\tTemperature{mValue=41.3, mType=0, mName=CPU, mStatus=1}
Current cooling devices from HAL:
"""

# Android 13, a Pixel 7: virtual skin sensors, thresholds with NaN, at MODERATE
ANDROID_13_PIXEL = LISTENERS + """Thermal Status: 2
Cached temperatures:
\tTemperature{mValue=41.2, mType=3, mName=VIRTUAL-SKIN, mStatus=2}
HAL Ready: true
HAL connection:
\tThermalHAL 2.0 connected: yes
Current temperatures from HAL:
\tTemperature{mValue=40.05, mType=2, mName=battery, mStatus=0}
\tTemperature{mValue=52.912, mType=0, mName=BIG, mStatus=0}
\tTemperature{mValue=47.5, mType=0, mName=MID, mStatus=0}
\tTemperature{mValue=45.025, mType=1, mName=G3D, mStatus=0}
\tTemperature{mValue=41.561, mType=3, mName=VIRTUAL-SKIN, mStatus=2}
\tTemperature{mValue=38.9, mType=3, mName=VIRTUAL-SKIN-HINT, mStatus=0}
\tTemperature{mValue=44.1, mType=10, mName=TPU, mStatus=0}
\tTemperature{mValue=39.2, mType=4, mName=VIRTUAL-USB-UI, mStatus=0}
Current cooling devices from HAL:
\tCoolingDevice{mValue=3, mType=0, mName=fan}
Temperature static thresholds from HAL:
\tTemperatureThreshold{mType=3, mName=VIRTUAL-SKIN, mHotThrottlingThresholds=[NaN, 39.0, 43.0, 45.0, 46.5, 52.0, 55.0], mColdThrottlingThresholds=[NaN, NaN, NaN, NaN, NaN, NaN, NaN]}
"""

# Android 14, a Snapdragon phone (Xiaomi-style names): SEVERE; the cache still holds an older, hotter
# event (mStatus=4) that is not the present
ANDROID_14_SNAPDRAGON = LISTENERS + """Thermal Status: 3
Cached temperatures:
\tTemperature{mValue=47.3, mType=3, mName=xo-therm, mStatus=4}
HAL Ready: true
HAL connection:
\tThermalHAL AIDL 1  connected: yes
Current temperatures from HAL:
\tTemperature{mValue=55.3, mType=0, mName=cpu-0-0-0, mStatus=0}
\tTemperature{mValue=58.1, mType=9, mName=nsphvx-0, mStatus=0}
\tTemperature{mValue=38.4, mType=2, mName=battery, mStatus=0}
\tTemperature{mValue=44.4, mType=3, mName=xo-therm, mStatus=3}
\tTemperature{mValue=40.2, mType=3, mName=quiet-therm, mStatus=1}
Current cooling devices from HAL:
Temperature static thresholds from HAL:
\tTemperatureThreshold{mType=3, mName=xo-therm, mHotThrottlingThresholds=[NaN, 38.0, 41.0, 44.0, 47.0, NaN, NaN], mColdThrottlingThresholds=[NaN, NaN, NaN, NaN, NaN, NaN, NaN]}
"""

# Android 15/16: a status override for testing (`cmd thermalservice override-status 4`), headroom
# thresholds at the end, values as Java prints floats (1E notation too)
ANDROID_16_OVERRIDE = LISTENERS.replace("IsStatusOverride: false", "IsStatusOverride: true") + """\
Thermal Status: 4
Cached temperatures:
HAL Ready: true
HAL connection:
\tThermalHAL AIDL 2  connected: yes
Current temperatures from HAL:
\tTemperature{mValue=3.61E1, mType=3, mName=skin, mStatus=0}
\tTemperature{mValue=NaN, mType=2, mName=battery, mStatus=0}
Current cooling devices from HAL:
Temperature static thresholds from HAL:
Temperature headroom thresholds:
[0.88, 0.94, 1.0, 1.06, 1.12, 1.19]
"""

# the HAL not (yet) connected: only the cache (the last throttling events) is there
HAL_NOT_READY = LISTENERS + """Thermal Status: 2
Cached temperatures:
\tTemperature{mValue=42.0, mType=3, mName=skin, mStatus=2}
HAL Ready: false
"""


@pytest.mark.parametrize(("sample", "status", "temperature", "sensor", "count"), [
    (ANDROID_10_PIXEL, ThermalStatus.NONE, 29.4, "skin", 6),
    (ANDROID_12_SAMSUNG, ThermalStatus.NONE, 24.9, "LRF", 6),
    (ANDROID_12_SAMSUNG_FLAT, ThermalStatus.NONE, 24.9, "LRF", 6),
    (ANDROID_11_TABLET, ThermalStatus.LIGHT, 41.3, "CPU", 1),
    (ANDROID_13_PIXEL, ThermalStatus.MODERATE, 41.561, "VIRTUAL-SKIN", 8),
    (ANDROID_14_SNAPDRAGON, ThermalStatus.SEVERE, 44.4, "xo-therm", 5),
    (ANDROID_16_OVERRIDE, ThermalStatus.CRITICAL, 36.1, "skin", 1),
    (HAL_NOT_READY, ThermalStatus.MODERATE, 42.0, "skin", 1),
], ids=["a10-pixel", "a12-samsung", "a12-samsung-flat", "a11-tablet-cpu-only", "a13-pixel", "a14-snapdragon",
        "a16-override", "hal-not-ready"])
def test_thermalservice_of_each_version_gives_status_and_the_skin_temperature(
        sample: str, status: ThermalStatus, temperature: float, sensor: str, count: int) -> None:
    reading = parse_thermalservice(sample)
    assert reading.error is None
    assert reading.status is status
    assert reading.temperature_c == temperature
    assert reading.sensor is not None and reading.sensor.name == sensor
    assert len(reading.sensors) == count  # absent (0.0, NaN) and BCL sensors left out


def test_the_hal_reading_wins_over_the_stale_cache() -> None:
    reading = parse_thermalservice(ANDROID_14_SNAPDRAGON)
    skin = next(s for s in reading.sensors if s.name == "xo-therm")
    assert (skin.celsius, skin.status, skin.type) == (44.4, 3, 3)


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty output"),
    ("Can't find service: thermalservice\n", "Can't find service: thermalservice"),  # Android 9 and older
    (("Permission Denial: can't dump thermalservice from from pid=4242, uid=2000 due to missing "
      "android.permission.DUMP permission\n"), "Permission Denial"),
    ("/system/bin/sh: dumpsys: inaccessible or not found\n", "not found"),
])
def test_thermalservice_that_cannot_be_read_says_why(text: str, why: str) -> None:
    reading = parse_thermalservice(text)
    assert reading.status is None and reading.temperature_c is None and reading.sensors == ()
    assert reading.error is not None and why in reading.error


@pytest.mark.parametrize(("text", "status", "temperature"), [
    ("Thermal Status: 9\n", None, None),  # not a PowerManager level
    ("Thermal Status: hot\n", None, None),
    ("Thermal Status: -1\n", None, None),
    ("Thermal Status: 3\r\nCurrent temperatures from HAL:\r\n\tTemperature{mValue=44.2, mType=3, mName=s, mStatus=3}\r\n",
     ThermalStatus.SEVERE, 44.2),  # CRLF (a pty)
    ("Thermal Status: 2\nCurrent temperatures from HAL:\n\tTemperature{mValue=44.1, mType=3, mN", ThermalStatus.MODERATE,
     None),  # cut off mid-line
    ("Current temperatures from HAL:\n\tTemperature{mValue=hot, mType=3, mName=skin, mStatus=0}\n", None, None),
    ("Current temperatures from HAL:\n\tTemperature{mValue=1e9, mType=3, mName=skin, mStatus=0}\n", None, None),
    ("Current temperatures from HAL:\n\tTemperature{mValue=-273.15, mType=3, mName=skin, mStatus=0}\n", None, None),
    ("Current temperatures from HAL:\n\tTemperature{mValue=33.0, mType=3, mName=skin, rear, mStatus=0}\n", None,
     33.0),  # a vendor's name with a comma
    ("Current temperatures from HAL:\n\tTemperature{mValue=33.0, mType=x, mName=odd, mStatus=}\n", None, 33.0),
    (("Thermal Status: 1\nCurrent temperatures from HAL:\n\tTemperature{mValue=31.5, mType=3, mName=skin, mStatus=0}"
      "\n\tTemperature{mValue=31.5, mType=3, mName=skin, mStatus=0}\n"), ThermalStatus.LIGHT, 31.5),  # repeated
    ("Thermal Status: 3\rCurrent temperatures from HAL:\r\tTemperature{mValue=44.2, mType=3, mName=s, mStatus=3}\r",
     ThermalStatus.SEVERE, 44.2),  # lone CRs (a pty's output cut of its \n): the status was lost
    ("Current temperatures from HAL:\n\tTemperature{mValue=44,3, mType=3, mName=skin, mStatus=0}\n", None,
     44.3),  # a decimal comma (a vendor HAL formatting for its locale): was unknown
    ("Thermal Status: x\nThermal Status: 2\n", ThermalStatus.MODERATE, None),  # the first readable one
])
def test_malformed_thermalservice_gives_unknowns_not_errors(text: str, status: ThermalStatus | None,
                                                             temperature: float | None) -> None:
    reading = parse_thermalservice(text)
    assert reading.status is status and reading.temperature_c == temperature


ANDROID_5_NEXUS = """Current Battery Service state:
  AC powered: false
  USB powered: true
  Wireless powered: false
  status: 2
  health: 2
  present: true
  level: 57
  scale: 100
  voltage: 3940
  temperature: 280
  technology: Li-ion
"""

ANDROID_9_PIXEL = """Current Battery Service state:
  AC powered: true
  USB powered: false
  Wireless powered: false
  Max charging current: 3000000
  Max charging voltage: 5000000
  Charge counter: 2964000
  status: 2
  health: 2
  present: true
  level: 84
  scale: 100
  voltage: 4063
  temperature: 326
  technology: Li-ion
"""

# Samsung adds dozens of keys, some repeating the standard ones in lower case
ANDROID_12_SAMSUNG_BATTERY = """Current Battery Service state:
  AC powered: false
  USB powered: false
  Wireless powered: false
  Max charging current: 0
  Max charging voltage: 0
  Charge counter: 2190000
  status: 3
  health: 2
  present: true
  level: 46
  scale: 100
  voltage: 3805
  temperature: 301
  technology: Li-ion
  mSecPlugTypeSummary: 0
  LED Charging: true
  LED Low Battery: true
  current now: -412
  charge counter: 2190000
  Adaptive Fast Charging Settings: true
  Super Fast Charging Settings: false
  FEATURE_WIRELESS_FAST_CHARGER_CONTROL: true
  mWasUsedWirelessFastChargerPreviously: false
  LLB CAL: 20210802
  LLB MAN: 20210512
  LLB CURRENT: YEAR2021M8D2
  batteryMiscEvent: 0
  batteryCurrentEvent: 0
  mSecBatteryHealthCheck: 0
  level: 99
"""

ANDROID_14_PIXEL_FULL = """Current Battery Service state:
  AC powered: false
  USB powered: true
  Wireless powered: false
  Dock powered: false
  Max charging current: 500000
  Max charging voltage: 5000000
  Charge counter: 4499000
  status: 5
  health: 2
  present: true
  level: 100
  scale: 100
  voltage: 4386
  temperature: 280
  technology: Li-ion
  Charging state: 1
  Charging policy: 1
  Capacity level: 5
"""

# after `dumpsys battery set level 5` and `dumpsys battery unplug` (testing the battery floor on a real phone)
UNPLUGGED_FOR_TESTING = """Current Battery Service state:
  (UPDATES STOPPED -- use 'reset' to restart)
  AC powered: false
  USB powered: false
  Wireless powered: false
  status: 3
  health: 2
  present: true
  level: 5
  scale: 100
  voltage: 3620
  temperature: 290
  technology: Li-ion
"""


@pytest.mark.parametrize(("sample", "level", "charging", "plugged", "temperature", "stopped"), [
    (ANDROID_5_NEXUS, 57.0, True, True, 28.0, False),
    (ANDROID_9_PIXEL, 84.0, True, True, 32.6, False),
    (ANDROID_12_SAMSUNG_BATTERY, 46.0, False, False, 30.1, False),  # the first `level` wins
    (ANDROID_14_PIXEL_FULL, 100.0, True, True, 28.0, False),  # full on a charger counts as charging
    (UNPLUGGED_FOR_TESTING, 5.0, False, False, 29.0, True),
], ids=["a5-nexus", "a9-pixel-ac", "a12-samsung-discharging", "a14-pixel-full", "unplugged-for-testing"])
def test_battery_of_each_version(sample: str, level: float, charging: bool, plugged: bool, temperature: float,
                                 stopped: bool) -> None:
    reading = parse_battery(sample)
    assert reading.error is None
    assert (reading.level_pct, reading.charging, reading.plugged) == (level, charging, plugged)
    assert reading.temperature_c == temperature and reading.updates_stopped is stopped


@pytest.mark.parametrize(("text", "level", "charging"), [
    ("Current Battery Service state:\n  level: 845\n  scale: 1000\n", 84.5, None),  # another scale
    ("Current Battery Service state:\n  level: 50\n  scale: 0\n", 50.0, None),
    ("Current Battery Service state:\n  level: abc\n  status: 2\n", None, True),
    ("Current Battery Service state:\n  level: 250\n  scale: 100\n  USB powered: true\n", None, True),
    ("Current Battery Service state:\n  level: 40\n  status: 7\n  AC powered: maybe\n", 40.0, None),
    ("Current Battery Service state:\n  level: 40\n  status: 4\n  USB powered: true\n", 40.0, False),  # not charging
    ("  level: 33\n  temperature: -2731\n", 33.0, None),  # no header, an impossible temperature
    ("Current Battery Service state:\r\n  level: 12\r\n  status: 3\r\n", 12.0, False),
    ("Current Battery Service state:\n  level:\n  level: 61\n", 61.0, None),
])
def test_malformed_battery_gives_unknowns_not_errors(text: str, level: float | None, charging: bool | None) -> None:
    reading = parse_battery(text)
    assert (reading.level_pct, reading.charging) == (level, charging)


@pytest.mark.parametrize("text", ["", "Can't find service: battery\n", "\x00\xff garbage", "level=50\n"])
def test_battery_that_cannot_be_read_says_why(text: str) -> None:
    reading = parse_battery(text)
    assert reading.level_pct is None and reading.charging is None and reading.error


def test_thermal_zones_guess_their_unit_and_skip_what_is_not_a_temperature() -> None:
    text = ("cpu-0-0-usr 42300\nbattery 31000\nskin-therm 33500\npm8150b_tz 36\nxo-therm 338\n"
            "cat: /sys/class/thermal/thermal_zone9/temp: Invalid argument\nbcl-zone -2147483648\n"
            "gpu-usr\n 40000\nsensor with spaces 1\n")
    reading = parse_thermal_zones(text)
    assert {s.name: s.celsius for s in reading.sensors} == {
        "cpu-0-0-usr": 42.3, "battery": 31.0, "skin-therm": 33.5, "pm8150b_tz": 36.0, "xo-therm": 33.8}
    assert reading.status is None and reading.temperature_c == 33.5  # the skin zone
    assert parse_thermal_zones("").error is not None


def test_one_poll_reads_the_service_else_the_zones_and_the_battery() -> None:
    service = parse_health(f"{ANDROID_14_SNAPDRAGON}{BATTERY_MARK}\n{ANDROID_9_PIXEL}")
    assert service.thermal.status is ThermalStatus.SEVERE and service.battery.level_pct == 84.0
    zones = parse_health(f"Can't find service: thermalservice\n{ZONES_MARK}\nskin-therm 33500\n"
                         f"{BATTERY_MARK}\nCan't find service: battery\n")
    assert zones.thermal.temperature_c == 33.5 and zones.thermal.status is None
    assert zones.battery.level_pct is None and zones.battery.error
    assert parse_health("").thermal.error and parse_health("").battery.error


SAMPLES = [ANDROID_10_PIXEL, ANDROID_12_SAMSUNG, ANDROID_13_PIXEL, ANDROID_14_SNAPDRAGON, ANDROID_16_OVERRIDE,
           ANDROID_5_NEXUS, ANDROID_12_SAMSUNG_BATTERY, UNPLUGGED_FOR_TESTING]


@given(text=st.text())
def test_no_text_makes_a_parser_raise(text: str) -> None:
    parse_thermalservice(text)
    parse_battery(text)
    parse_thermal_zones(text)
    parse_health(text)


@given(data=st.data(), sample=st.sampled_from(SAMPLES))
def test_damaged_samples_never_make_a_parser_raise(data: st.DataObject, sample: str) -> None:
    # cut, splice and insert anywhere: what a truncated or interleaved adb stream could deliver
    cut = data.draw(st.integers(0, len(sample)))
    junk = data.draw(st.text(alphabet=st.sampled_from("{}=,:\t\n mValue0123456789.-NaE"), max_size=40))
    damaged = sample[:cut] + junk + sample[data.draw(st.integers(cut, len(sample))):]
    thermal, battery = parse_thermalservice(damaged), parse_battery(damaged)
    assert thermal.status is None or 0 <= thermal.status <= 6
    assert thermal.temperature_c is None or -40 <= thermal.temperature_c <= 150
    assert battery.level_pct is None or 0 <= battery.level_pct <= 100


# A poll's output is parsed on the event loop, so a parser's time is every stream's: it must grow
# linearly with the output (at most OUTPUT_MAX). The bounds below are ~100x what linear parsing takes
# on a loaded machine; before, a line of 1,000 spaces took `parse_battery` 4 s and 4,000 took 3 min
# (nested lazy/greedy `\s*` in its key: value pattern), and a run of `Temperature{` without a closing
# brace was quadratic in `parse_thermalservice`.
PARSERS = (parse_thermalservice, parse_battery, parse_thermal_zones, parse_health)
LINEAR_BOUND_S = 5.0


def _parse_time(text: str) -> float:
    import time

    worst = 0.0
    for parse in PARSERS:
        t0 = time.perf_counter()
        parse(text)
        worst = max(worst, time.perf_counter() - t0)
    return worst


@pytest.mark.parametrize("text", [
    " " * OUTPUT_MAX,  # a blank line as long as a poll's output
    "level:" + " " * (OUTPUT_MAX - 7) + "x",
    "\t \r" * (OUTPUT_MAX // 3),
    "Temperature{" * (OUTPUT_MAX // 12),  # braces never closed
    "Temperature{mValue=1, " * (OUTPUT_MAX // 22),
    "Thermal Status:" + " " * OUTPUT_MAX + "x",
    "\n" * OUTPUT_MAX,
    ", m" * (OUTPUT_MAX // 3),
    "Temperature{" + "mA" * (OUTPUT_MAX // 2),
], ids=["blank-line", "blank-value", "whitespace-soup", "open-braces", "open-fields", "blank-status",
        "newlines", "comma-m", "long-field-name"])
def test_a_poll_output_of_the_largest_size_parses_in_linear_time(text: str) -> None:
    assert _parse_time(text) < LINEAR_BOUND_S


@settings(max_examples=25, deadline=None)
@given(fragment=st.text(alphabet=st.sampled_from(list("Temperature{}mVNS=,:  \t\r\n0123456789.-@qhx")),
                        min_size=1, max_size=24))
def test_no_repeated_fragment_makes_a_parser_slow(fragment: str) -> None:
    # the class of the above: any short pattern repeated to 64 KB (cubic parsing would take hours)
    text = fragment * (64 * 1024 // len(fragment))
    assert _parse_time(text) < LINEAR_BOUND_S
