"""Check 5, session protocol: start the runtime in session mode, ``ready`` within the timeout and its
fields (proto, checkpoints), a ``ping``/``pong`` round trip, one greedy generation of the card's
prompt, and a ``cancel`` honoured within one token (plus what was in flight during one round trip).
A runtime without sessions is a warning, not a failure: the server serves it one process per request.
The session stays open for the checks after this one (the runner closes it)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence

from server.backends.adb.session import Session, SessionUnsupported
from server.backends.base import Finished, GenerationParams, Tokens
from server.errors import BackendError
from server.ops.doctor.context import MAX_NEW, PROMPT, PhoneContext
from server.ops.doctor.report import CheckResult, Status

PROTO = 1
CANCEL_MAX_NEW = 256
CANCEL_AFTER = 3  # tokens: past any start-up burst
CANCEL_SLACK_S = 0.05


async def generate(ctx: PhoneContext, session: Session, prompt_ids: Sequence[int], max_new: int, *,
                   stop_ids: Sequence[int], request_id: str) -> tuple[list[int], Finished]:
    """One greedy request; its ids and how it finished."""
    params = GenerationParams(request_id=request_id, model="doctor", prompt_ids=list(prompt_ids), max_new=max_new,
                              temperature=0.0, stop_ids=list(stop_ids))
    ids: list[int] = []
    finished: Finished | None = None
    async for event in session.generate(params):
        if isinstance(event, Tokens):
            ids.extend(event.ids)
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None
    return ids, finished


async def check_session(ctx: PhoneContext) -> CheckResult:
    assert ctx.bundle is not None
    settings = ctx.settings
    command = ctx.launcher().command(ctx.bundle, "-", settings.session_max_new)
    ctx.steps.step(ctx.serial, "session: waiting for `ready`")
    t0 = time.monotonic()
    try:
        ctx.runtime_command = command
        session = await Session.start(ctx.client, ctx.serial, command, settings)
    except SessionUnsupported as e:
        return ctx.result(Status.WARN, f"one-shot only (each request reloads the model): {e}",
                          advice="qhx-server serves this phone one process per request (device_mode auto falls "
                          "back by itself); a qhx_generate with session protocol v1 loads the model once",
                          command="qhx-server serve --device-mode oneshot", data={"session": False})
    except BackendError as e:
        if await ctx.listed_state() != "device":
            raise  # the phone went away: the runner says so, not "the runtime did not start"
        return ctx.result(Status.FAIL, f"session start failed: {e}",
                          advice=f"the runtime must print a `ready` line within {settings.ready_timeout_s:g} s "
                          "(ready_timeout_s); start it by hand and watch stderr",
                          command=ctx.adb_shell(command), data={"session": False})
    ctx.session = session
    ready_s = time.monotonic() - t0
    ready = session.ready
    slots = ready.get("checkpoints")
    data: dict[str, object] = {"session": True, "ready_s": round(ready_s, 3), "proto": ready.get("proto"),
                               "load_ms": ready.get("load_ms"), "checkpoints": slots,
                               "ready": {k: v for k, v in ready.items() if k != "ev"}}
    if ready.get("proto") != PROTO:
        return ctx.result(Status.FAIL, f"`ready` says proto {ready.get('proto')!r}; the host speaks {PROTO}",
                          advice="use a qhx_generate that speaks session protocol v1", command=ctx.provision()
                          + " --runtime <folder with a v1 qhx_generate>", data=data)
    rtt = await session.ping()
    data["ping_ms"] = round(rtt * 1000, 2)
    tok = await ctx.host_tokenizer()
    prompt_ids = tok.encode(PROMPT)
    ctx.steps.step(ctx.serial, "session: one generation")
    ids, done = await generate(ctx, session, prompt_ids, MAX_NEW, stop_ids=ctx.stop_ids(tok), request_id="doctor-1")
    ctx.session_ids = ids
    tps = len(ids) / (done.decode_ms / 1000) if done.decode_ms > 0 else math.inf
    ctx.session_tps = tps
    data.update(tokens=len(ids), finish_reason=done.reason, tps=tps if math.isfinite(tps) else None)
    ctx.steps.step(ctx.serial, "session: cancel")
    cancel = await _cancel(ctx, session, prompt_ids, rtt, tps)
    data["cancel"] = cancel
    slots_text = f"{slots} checkpoint slots" if isinstance(slots, int) and slots > 0 else "v1, no checkpoints"
    said = (f"ready in {ready_s:.1f} s (proto {ready.get('proto')}, load {ready.get('load_ms')} ms, {slots_text}), "
            f"ping {rtt * 1000:.1f} ms, {len(ids)} tokens ({done.reason}), {cancel['summary']}")
    if not cancel["ok"]:
        return ctx.result(Status.WARN, said, advice="a cancelled request keeps the phone busy until the runtime "
                          "notices; clients that disconnect cost phone time. Update qhx_generate",
                          command=ctx.provision() + " --runtime <folder with a newer qhx_generate>", data=data)
    return ctx.result(Status.PASS, said, data=data)


async def _cancel(ctx: PhoneContext, session: Session, prompt_ids: list[int], rtt: float,
                  tps: float) -> dict[str, object]:
    """Cancel a long request once it decodes steadily (its third token): how many tokens still came.

    Allowed: the one being decoded when the cancel arrives, plus what the phone decodes while the
    cancel travels (a round trip and a host scheduling slack of CANCEL_SLACK_S, at the measured rate)."""
    params = GenerationParams(request_id="doctor-cancel", model="doctor", prompt_ids=prompt_ids,
                              max_new=min(CANCEL_MAX_NEW, ctx.settings.session_max_new), temperature=0.0)
    seen, after = 0, None
    reason = None
    async with asyncio.timeout(ctx.settings.ready_timeout_s + ctx.settings.cancel_timeout_s):
        async for event in session.generate(params):
            if isinstance(event, Tokens):
                if after is not None:
                    after += len(event.ids)
                    continue
                seen += len(event.ids)
                if seen >= CANCEL_AFTER:
                    after = 0
                    await session.cancel(params.request_id)
            elif isinstance(event, Finished):
                reason = event.reason
    in_flight = math.ceil((rtt + CANCEL_SLACK_S) * tps) if math.isfinite(tps) else math.inf
    allowed = 1 + in_flight
    if reason != "cancelled":
        return {"ok": True, "tokens_after": after, "reason": reason,
                "summary": f"the request ended ({reason}) before the cancel took effect: not measured"}
    ok = after is not None and after <= allowed
    return {"ok": ok, "tokens_after": after, "reason": reason, "allowed": allowed if math.isfinite(allowed) else None,
            "summary": f"cancel honoured after {after} token(s)" if ok else
            f"cancel took {after} tokens (allowed {allowed}: one, plus {in_flight} in flight)"}
