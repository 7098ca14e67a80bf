"""Check 7, health: the phone's thermal status, temperature and battery (phone telemetry,
server/backends/adb/telemetry.py, read before and after, as the server polls it), and the decode rate sustained over a
window (``--health-seconds``, 20 s by default) against the model card's, with the first and last
quarter of the window compared (a phone that throttles slows down as it heats). Skipped with
``--quick``."""

from __future__ import annotations

import asyncio
import math
from typing import Any

from server.backends.adb.dumpsys import ThermalStatus
from server.backends.adb.telemetry import read_health
from server.backends.base import GenerationParams, Tokens
from server.errors import QhxError
from server.ops.doctor.context import PROMPT, SLOW_SHARE, Findings, PhoneContext, Skip, fmt_tps
from server.ops.doctor.report import CheckResult
from server.ops.doctor.runs import run_oneshot

SEVERE = ThermalStatus.SEVERE  # the phone throttles hard
LOW_BATTERY = 20.0


async def check_health(ctx: PhoneContext) -> CheckResult:
    if ctx.options.quick:
        raise Skip("--quick")
    found = Findings()
    before, why_not = await _telemetry(ctx)
    if ctx.session is not None:
        rate, first_q, last_q, tokens = await _sustained_session(ctx)
    else:
        rate, first_q, last_q, tokens = await _sustained_oneshot(ctx)
    after, _ = await _telemetry(ctx) if before is not None else (None, why_not)
    data: dict[str, Any] = {"window_s": ctx.options.health_s, "tokens": tokens, "tps": rate, "card_tps": ctx.card_tps,
                            "first_quarter_tps": first_q, "last_quarter_tps": last_q,
                            "telemetry": {"before": before, "after": after, "skipped": why_not}}
    said = f"sustained {fmt_tps(rate)} over {ctx.options.health_s:g} s ({tokens} tokens)"
    # what the phone says of itself first: a SEVERE reading or a flat battery is the cause the rate
    # warnings below only hint at, and the summary leads with the first warning
    if before is not None:
        _telemetry_warnings(ctx, after or before, found)
    if rate is not None and math.isfinite(rate):
        said += f", {rate / ctx.card_tps:.0%} of the card's {ctx.card_tps:g}"
        if rate < SLOW_SHARE * ctx.card_tps:
            found.warn(f"below {SLOW_SHARE:.0%} of the card's rate", advice="a phone this slow over time is "
                       "throttling or in battery saver; let it cool and plug it in",
                       command=ctx.adb_shell("dumpsys thermalservice | head -n 3"))
    if first_q and last_q and math.isfinite(first_q) and last_q < SLOW_SHARE * first_q:
        found.warn(f"decode slowed down during the run ({first_q:.1f} -> {last_q:.1f} tok/s): throttling",
                   advice="cooling (a fan, no case) keeps the rate up under load",
                   command=ctx.adb_shell("dumpsys thermalservice | head -n 3"))
    said += f"; telemetry skipped: {why_not}" if before is None else "; " + _describe(after or before)
    result = found.result(data, summary=said)
    if found.warns:
        result.summary = f"{result.summary} ({said})"
    return result


async def _telemetry(ctx: PhoneContext) -> tuple[dict[str, Any] | None, str | None]:
    """(thermal and battery reading, None) or (None, why there is none)."""
    try:
        reading = await read_health(ctx.client, ctx.serial, ctx.settings.adb_timeout_s)
    except QhxError as e:
        return None, f"the phone did not answer dumpsys: {e}"
    thermal, battery = reading.thermal, reading.battery
    status = thermal.status
    if status is None and thermal.temperature_c is None and battery.level_pct is None:
        return None, f"the phone says nothing of its temperature or battery ({thermal.error or battery.error})"
    return {
        "thermal_status": status.name if status is not None else None,
        "thermal_level": int(status) if status is not None else None,
        "temperature_c": thermal.temperature_c,
        "battery_pct": battery.level_pct,
        "charging": battery.charging,
        "battery_temperature_c": battery.temperature_c,
    }, None


def _describe(reading: dict[str, Any]) -> str:
    parts = [f"thermal {reading['thermal_status'] or 'unknown'}"]
    if reading["temperature_c"] is not None:
        parts.append(f"{reading['temperature_c']:.1f} C")
    if reading["battery_pct"] is not None:
        charging = {True: ", charging", False: ", not charging"}.get(reading["charging"], "")
        parts.append(f"battery {reading['battery_pct']:.0f}%{charging}")
    return ", ".join(parts)


def _telemetry_warnings(ctx: PhoneContext, reading: dict[str, Any], found: Findings) -> None:
    level = reading["thermal_level"]
    if level is not None and level >= SEVERE:
        found.warn(f"thermal status {reading['thermal_status']}: the phone throttles",
                   advice="let it cool (no case, a fan, out of the sun) before serving",
                   command=ctx.adb_shell("dumpsys thermalservice | head -n 3"))
    if reading["battery_pct"] is not None and reading["battery_pct"] < LOW_BATTERY and reading["charging"] is False:
        found.warn(f"battery {reading['battery_pct']:.0f}% and not charging",
                   advice="plug the phone in (a bench phone serves on mains power)",
                   command=ctx.adb_shell("dumpsys battery"))


async def _sustained_session(ctx: PhoneContext) -> tuple[float | None, float | None, float | None, int]:
    """Back-to-back greedy requests without stop ids for the window; token arrival times on the host."""
    session = ctx.session
    assert session is not None and ctx.bundle is not None
    tok = await ctx.host_tokenizer()
    prompt_ids = tok.encode(PROMPT)
    window = ctx.options.health_s
    max_new = max(1, min(ctx.settings.session_max_new, ctx.bundle.context - len(prompt_ids)))
    loop = asyncio.get_running_loop()
    start = loop.time()
    spans: list[list[float]] = []  # per request: arrival time of each token
    ctx.steps.step(ctx.serial, f"health: decoding for {window:g} s", total=window)
    shown = 0.0
    n = 0
    while loop.time() - start < window:
        n += 1
        params = GenerationParams(request_id=f"doctor-health-{n}", model="doctor", prompt_ids=prompt_ids,
                                  max_new=max_new, temperature=0.0)
        times: list[float] = []
        spans.append(times)
        cancelled = False
        async for event in session.generate(params):
            if isinstance(event, Tokens):
                now = loop.time()
                times.extend([now] * len(event.ids))
                elapsed = min(window, now - start)
                ctx.steps.advance_step(ctx.serial, elapsed - shown)
                shown = elapsed
                if now - start >= window and not cancelled:
                    cancelled = True
                    await session.cancel(params.request_id)
        if not times:  # a request that generates nothing would spin here
            break
    return _rates(spans, start, start + window)


def _rates(spans: list[list[float]], start: float, end: float) -> tuple[float | None, float | None, float | None, int]:
    """Overall tokens/s over each request's decode span, and over the window's first and last quarter."""
    tokens = sum(len(s) for s in spans)
    seconds = sum(s[-1] - s[0] for s in spans if len(s) > 1)
    counted = sum(len(s) - 1 for s in spans if len(s) > 1)
    rate = counted / seconds if seconds > 0 else (math.inf if counted else None)
    quarter = (end - start) / 4
    first = sum(1 for s in spans for t in s if t < start + quarter) / quarter if quarter > 0 else None
    last = sum(1 for s in spans for t in s if end - quarter <= t < end) / quarter if quarter > 0 else None
    return rate, first, last, tokens


async def _sustained_oneshot(ctx: PhoneContext) -> tuple[float | None, float | None, float | None, int]:
    """One long one-shot run (the runtime has no session); its own stats line gives the rate."""
    assert ctx.bundle is not None
    max_new = max(1, min(ctx.bundle.context - 16, math.ceil(ctx.card_tps * ctx.options.health_s)))
    run = await run_oneshot(ctx, PROMPT, max_new, "health: one long one-shot run")
    return run.tps, None, None, run.tokens
