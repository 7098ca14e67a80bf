"""A phone's busy/idle state and its request in flight are the Phone's (server/backends/adb/phone.py):
BUSY from admission until the runtime is done with the request, on either runtime, however the
request ends."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from server.backends.adb.phone import Phone
from server.backends.base import Finished, GenerationParams, PhoneState, Tokens
from server.errors import NoPhoneAvailable, PhoneBusy
from server.sim.harness import SimLab
from tests.backends.adb_helpers import knobs, sim_of, wait_state

MakePhone = Callable[..., Awaitable[Phone]]
PROMPT_IDS = [9707, 11, 1879, 0]


def params(rid: str, max_new: int) -> GenerationParams:
    return GenerationParams(rid, "qwen3.5-0.8b", PROMPT_IDS, max_new)


@pytest.mark.parametrize("kind", ["session", "oneshot"])
async def test_the_phone_is_ready_when_its_consumer_hears_finished(make_phone: MakePhone, kind: str) -> None:
    phone = await make_phone(device_mode=kind)
    assert phone.mode == kind
    agen = phone.generate(params(f"f-{kind}", 3))
    seen = []
    async for ev in agen:
        seen.append((ev, phone.state, phone.health()[0].request_in_flight))
        if isinstance(ev, Finished):
            break  # the generator is not closed yet: a pool may hand the phone on right now
    assert [(s, r) for ev, s, r in seen if not isinstance(ev, Finished)] == [
        (PhoneState.BUSY, f"f-{kind}")
    ] * (len(seen) - 1)
    assert seen[-1][1:] == (PhoneState.READY, None)
    await agen.aclose()  # type: ignore[attr-defined]
    assert phone.state is PhoneState.READY
    await phone.aclose()


async def test_a_request_whose_consumer_left_keeps_the_phone_busy_until_the_runtime_let_go(
    lab: SimLab, make_phone: MakePhone
) -> None:
    """The consumer is cancelled twice (the second cuts its wait for the phone short): the phone stays
    BUSY with that request in flight while the runtime winds it down, and leaves BUSY only when the
    runtime is done (here: it ignored the cancel and was restarted). Another request waits for that,
    and never runs on the phone meanwhile."""
    phone = await make_phone()
    sim = sim_of(lab, phone)
    first = asyncio.Event()

    async def consume() -> None:
        async for ev in phone.generate(params("left", 500)):
            if isinstance(ev, Tokens):
                first.set()

    with knobs(sim, speed=1):
        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 10)
        sim.configure(hang=True)  # from the next token on, the runtime ignores cancel
        await asyncio.sleep(0.5)  # > the runtime's knob re-read + one token time at speed 1
        task.cancel()
        for _ in range(100):  # until the session winds the request down (bounded)
            await asyncio.sleep(0.01)
            if phone.runtime is not None and phone.runtime.settling is not None:
                break
        task.cancel()  # the consumer stops waiting for the phone
        with pytest.raises(asyncio.CancelledError):
            await task
        assert phone.runtime is not None and phone.runtime.settling is not None
        assert phone.state is PhoneState.BUSY and phone.health()[0].request_in_flight == "left"
        with pytest.raises((PhoneBusy, NoPhoneAvailable)):  # (busy only if the wait ran out first)
            async for _ in phone.generate(params("next", 1)):
                pass
        await wait_state(phone, PhoneState.RESTARTING, PhoneState.READY, PhoneState.QUARANTINED, timeout=15)
        assert phone.health()[0].request_in_flight is None and phone.runtime.settling is None
    await wait_state(phone, PhoneState.READY)
    await phone.aclose()
