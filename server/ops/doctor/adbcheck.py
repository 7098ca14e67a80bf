"""Check 1, adb: the phone's adb state (with the fix for each state that is not ``device``), its
Android version, model, ``ro.soc.model`` and that SoC's Hexagon arch."""

from __future__ import annotations

import shlex

from server.backends.adb.discovery import SOC_ARCH, parse_props
from server.ops.doctor.context import PhoneContext, adb_base
from server.ops.doctor.report import CheckResult, Status

NOT_LISTED = "not listed"

_UNAUTHORIZED = (
    "unlock the phone and accept 'Allow USB debugging?' (tick 'Always allow from this computer'); "
    "no prompt: Developer options > Revoke USB debugging authorizations, then reconnect")
STATE_FIX = {
    "unauthorized": _UNAUTHORIZED,
    "authorizing": _UNAUTHORIZED,
    "connecting": (
        "adb is still connecting to the phone: wait a few seconds; stuck there: replug it, then reconnect"),
    "offline": (
        "the phone's adbd does not answer: replug the cable (USB) or toggle Wireless debugging, "
        "then reconnect; still offline: restart the adb server (adb kill-server)"),
    "no permissions": (
        "the host may not open the USB device: add a udev rule for the phone's vendor (Linux) "
        "and replug"),
}


async def check_adb(ctx: PhoneContext) -> CheckResult:
    state = ctx.adb_state
    if state == NOT_LISTED:
        tcp = ":" in ctx.serial
        return ctx.result(
            Status.FAIL, f"{ctx.serial} is not listed by adb server {ctx.client.address}",
            advice=("connect it (adb over Wi-Fi/TCP)" if tcp else
                    "plug it in with USB debugging on (Developer options), then list it"),
            command=(f"{adb_base(ctx.client.address)} connect {shlex.quote(ctx.serial)}" if tcp
                     else f"{adb_base(ctx.client.address)} devices -l"),
            data={"state": state})
    if state != "device":
        advice = STATE_FIX.get(state, f"adb lists the phone as {state!r}: reboot it into Android")
        return ctx.result(Status.FAIL, f"adb state is {state!r}, not 'device'", advice=advice,
                          command=f"{adb_base(ctx.client.address)} reconnect offline", data={"state": state})

    res = await ctx.shell("getprop")
    props = ctx.props = parse_props(res.text())
    r = ctx.report
    r.android = props.get("ro.build.version.release") or None
    r.sdk = props.get("ro.build.version.sdk") or None
    r.model = props.get("ro.product.model") or None
    r.soc = props.get("ro.soc.model") or None
    r.arch = SOC_ARCH.get(r.soc or "")
    r.simulated = props.get("ro.qhx.simulated") == "1"
    data = {"state": state, "android": r.android, "sdk": r.sdk, "model": r.model, "soc": r.soc, "arch": r.arch,
            "simulated": r.simulated}
    said = (f"device; Android {r.android or '?'} (SDK {r.sdk or '?'}); {r.model or 'model ?'}; "
            f"{r.soc or 'no ro.soc.model'}")
    if r.soc is None:
        return ctx.result(Status.WARN, said + ": the phone does not say its SoC, so its Hexagon arch is unknown",
                          advice="Android 12+ reports ro.soc.model; look for the chip in the other properties",
                          command=ctx.adb_shell("getprop | grep -i -E 'soc|platform|hardware'"), data=data)
    if r.arch is None:
        known = ", ".join(f"{soc}={arch}" for soc, arch in SOC_ARCH.items())
        return ctx.result(Status.WARN, said + " is not in the SoC -> Hexagon arch table",
                          advice=f"if you know its Hexagon arch, add it to SOC_ARCH in "
                          f"server/backends/adb/discovery.py (known: {known})",
                          command=ctx.adb_shell("getprop ro.board.platform"), data=data)
    return ctx.result(Status.PASS, said + f" = Hexagon {r.arch}" + (" (simulated phone)" if r.simulated else ""),
                      data=data)
