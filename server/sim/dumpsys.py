"""The simulated phone's ``dumpsys``: ``thermalservice`` and ``battery`` in Android's own format, from the
phone's body (server/sim/physics.py), so that the host reads a simulated phone exactly as a real one.

Run on the phone as ``/system/bin/dumpsys`` (a launcher the sandbox writes; stdlib only, as it starts
per call)::

    dumpsys thermalservice                 the format of Android 14-16 (ThermalManagerService, AIDL HAL)
    dumpsys battery                        the format of BatteryService (Android 14-16 keys)
    dumpsys battery set level|status|ac|usb|wireless|temp N
    dumpsys battery unplug | reset         as on a real phone: the values *reported* change (with
                                           "UPDATES STOPPED"), the body does not
    dumpsys <other>                        "Can't find service: <other>" on stderr

Sensors: ``VIRTUAL-SKIN`` is the body's temperature (the one the thermal status follows); the CPU and
NPU read a few degrees hotter while the phone works; the battery sits between the room and the skin;
the USB port sensor is absent (0.0, as such sensors read on real phones). Imports stay light (no
dataclasses, no simconfig): a process starts per call.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TextIO

from server.sim.physics import Body, Knobs, PhoneBody, thermal_status

BATTERY_KEYS = {"level", "status", "ac", "usb", "wireless", "temp"}


def render_thermalservice(body: Body, cfg: Knobs, now: float) -> str:
    """``dumpsys thermalservice`` for this body."""
    working = body.working(now)
    skin = body.temp_c
    status = thermal_status(skin, cfg)
    sensors = [
        (round(skin + (6.0 if working else 1.5), 1), 0, "cpu-1-0-0", 0),
        (round(skin + (9.0 if working else 1.0), 1), 9, "nsphvx-0", 0),
        (round(_battery_c(body, cfg), 1), 2, "battery", 0),
        (round(skin, 2), 3, "VIRTUAL-SKIN", status),
        (0.0, 4, "usb", 0),
    ]
    lines = ["IsStatusOverride: false", "ThermalEventListeners:", "\tcallbacks: 1", "\tkilled: false",
             "\tbroadcasts count: -1", "ThermalStatusListeners:", "\tcallbacks: 1", "\tkilled: false",
             "\tbroadcasts count: -1", f"Thermal Status: {status}", "Cached temperatures:"]
    lines += [_temperature(*s) for s in sensors if s[3] > 0]  # the cache holds throttling events only
    lines += ["HAL Ready: true", "HAL connection:", "\tThermalHAL AIDL 2  connected: yes",
              "Current temperatures from HAL:"]
    lines += [_temperature(*s) for s in sensors]
    lines += ["Current cooling devices from HAL:",
              f"\tCoolingDevice{{mValue={min(status, 3)}, mType=2, mName=thermal-cpufreq-0}}",
              "Temperature static thresholds from HAL:"]
    hot = ", ".join(["NaN", *(f"{t:.1f}" for t in cfg.thermal_status_c)][:7])
    lines.append(f"\tTemperatureThreshold{{mType=3, mName=VIRTUAL-SKIN, mHotThrottlingThresholds=[{hot}], "
                 "mColdThrottlingThresholds=[NaN, NaN, NaN, NaN, NaN, NaN, NaN]}")
    lines += ["Temperature headroom thresholds:", "[0.88, 0.94, 1.0, 1.06, 1.12, 1.19]"]
    return "\n".join(lines) + "\n"


def render_battery(body: Body, cfg: Knobs) -> str:
    """``dumpsys battery`` for this body (and what ``dumpsys battery set`` made it report)."""
    o = body.battery_override or {}
    level = o.get("level", round(body.battery_pct))
    usb = bool(o.get("usb", int(cfg.charging)))
    ac, wireless = bool(o.get("ac", 0)), bool(o.get("wireless", 0))
    plugged = ac or usb or wireless
    status = o.get("status", (5 if level >= 100 else 2) if plugged else 3)
    temp = o.get("temp", round(_battery_c(body, cfg) * 10))
    lines = ["Current Battery Service state:"]
    if o:
        lines.append("  (UPDATES STOPPED -- use 'reset' to restart)")
    lines += [f"  AC powered: {_bool(ac)}", f"  USB powered: {_bool(usb)}", f"  Wireless powered: {_bool(wireless)}",
              "  Dock powered: false", f"  Max charging current: {500000 if plugged else 0}",
              f"  Max charging voltage: {5000000 if plugged else 0}", f"  Charge counter: {level * 45000}",
              f"  status: {status}", f"  health: {3 if temp >= 450 else 2}", "  present: true",
              f"  level: {level}", "  scale: 100", f"  voltage: {3500 + 7 * level}", f"  temperature: {temp}",
              "  technology: Li-ion", f"  Charging state: {1 if status == 2 else 0}", "  Charging policy: 1",
              f"  Capacity level: {_capacity_level(level)}"]
    return "\n".join(lines) + "\n"


def _battery_c(body: Body, cfg: Knobs) -> float:
    return cfg.ambient_c + 0.7 * (body.temp_c - cfg.ambient_c)


def _temperature(value: float, kind: int, name: str, status: int) -> str:
    return f"\tTemperature{{mValue={value}, mType={kind}, mName={name}, mStatus={status}}}"


def _bool(flag: bool) -> str:
    return "true" if flag else "false"


def _capacity_level(level: int) -> int:
    # BatteryManager.BATTERY_CAPACITY_LEVEL_*: 1 critical, 2 low, 3 normal, 4 high, 5 full
    return 5 if level >= 100 else 4 if level >= 80 else 3 if level >= 15 else 2 if level >= 5 else 1


def battery_command(body: PhoneBody, args: list[str], out: TextIO) -> int:
    """``dumpsys battery set KEY VALUE | unplug | reset`` (BatteryService's shell commands)."""
    args = [a for a in args if a != "-f"]
    if args[:1] == ["unplug"]:
        body.update(lambda b: _override(b, {"ac": 0, "usb": 0, "wireless": 0}))
        return 0
    if args[:1] == ["reset"]:
        body.update(lambda b: _override(b, None))
        return 0
    if args[:1] == ["set"] and len(args) == 3 and args[1] in BATTERY_KEYS and args[2].lstrip("-").isdigit():
        key, value = args[1], int(args[2])
        body.update(lambda b: _override(b, {key: value}))
        return 0
    out.write("Battery service (battery) commands:\n  set [-f] [ac|usb|wireless|status|level|temp] <value>\n"
              "  unplug [-f]\n  reset [-f]\n")
    return 1


def _override(b: Body, values: dict[str, int] | None) -> Body:
    return b._replace(battery_override={} if values is None else {**(b.battery_override or {}), **values})


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    sandbox = os.environ.get("QHX_SIM_SANDBOX")
    if not args:
        sys.stdout.write("Currently running services:\n  battery\n  thermalservice\n")
        return 0
    service = args[0]
    if service not in ("thermalservice", "battery") or not sandbox:
        sys.stderr.write(f"Can't find service: {service}\n")
        return 0
    body = PhoneBody(Path(sandbox))
    if service == "battery" and len(args) > 1:
        return battery_command(body, args[1:], sys.stdout)
    now = time.time()
    state, cfg = body.now(), body.config
    text = render_thermalservice(state, cfg, now) if service == "thermalservice" else render_battery(state, cfg)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
