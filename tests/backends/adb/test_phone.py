"""One phone in session mode, end to end through the real adb server and a simulated phone."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from server.backends.adb.discovery import discover
from server.backends.adb.phone import Phone
from server.backends.base import Event, Finished, GenerationParams, PhoneState, Started, Tokens
from server.errors import (
    ContextLengthExceeded,
    ModelNotFound,
    PhoneBusy,
    PhoneLost,
    PhoneRequestError,
    PhoneStalled,
)
from server.sim.harness import SimLab
from tests.backends.adb_helpers import knobs, sim_of, wait_state

MODEL = "qwen3.5-0.8b"


def params(rid: str, max_new: int = 16, prompt: list[int] | None = None, **kw: object) -> GenerationParams:
    return GenerationParams(rid, MODEL, prompt or [9707, 11, 1879, 0], max_new, **kw)  # type: ignore[arg-type]


async def collect(agen: AsyncIterator[Event]) -> list[Event]:
    return [ev async for ev in agen]


async def test_generate_yields_started_tokens_finished(phone: Phone) -> None:
    events = await collect(phone.generate(params("e2e", 12)))
    assert isinstance(events[0], Started) and events[0].phone == phone.serial
    assert events[0].prompt_tokens == 4 and events[0].state_tokens == 0
    assert all(isinstance(ev, Tokens) and ev.t_ms is not None for ev in events[1:-1])
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason == "length"
    ids = [i for ev in events[1:-1] for i in ev.ids]  # type: ignore[union-attr]
    assert len(ids) == fin.completion_tokens == 12
    assert phone.state is PhoneState.READY
    health = phone.health()[0]
    assert health.mode == "session" and health.model == MODEL and health.request_in_flight is None
    assert health.tokens_served >= 12 and health.soc == "SM8850"


async def test_model_info_comes_from_the_bundle(phone: Phone) -> None:
    [model] = phone.models()
    assert (model.name, model.precision, model.max_context) == (MODEL, "fp16", 1024)
    assert model.tokenizer_path.endswith(f"{model.tokenizer_sha256}/tokenizer.json")
    assert model.simulated and phone.health()[0].simulated  # getprop ro.qhx.simulated = 1


async def test_tokenizer_is_pulled_once_then_served_from_the_cache(phone: Phone) -> None:
    [model] = phone.models()
    cached = Path(model.tokenizer_path)
    before = cached.stat().st_mtime_ns
    facts = await discover(phone._client, phone.serial, phone.settings)
    assert facts.model is not None and facts.model.tokenizer_path == model.tokenizer_path
    assert cached.stat().st_mtime_ns == before  # not pulled again


async def test_cancel_mid_stream_leaves_the_same_session_reusable(lab: SimLab, phone: Phone) -> None:
    session = phone.runtime
    with knobs(sim_of(lab, phone), speed=1):
        agen = phone.generate(params("c1", 200))
        got = 0
        async for ev in agen:
            if isinstance(ev, Tokens):
                got += len(ev.ids)
                if got >= 2:
                    break
        t0 = time.monotonic()
        await agen.aclose()
        assert time.monotonic() - t0 < 1.0
        assert phone.state is PhoneState.READY
        events = await collect(phone.generate(params("c2", 3)))
    assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 3
    assert phone.runtime is session  # no restart happened


async def test_cancelling_the_consumer_task_cancels_on_the_phone(lab: SimLab, phone: Phone) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async for ev in phone.generate(params("t1", 200)):
            if isinstance(ev, Tokens):
                first.set()

    session = phone.runtime
    with knobs(sim_of(lab, phone), speed=1):
        task = asyncio.create_task(consume())
        await asyncio.wait_for(first.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_state(phone, PhoneState.READY, timeout=2)
        events = await collect(phone.generate(params("t2", 2)))
    assert isinstance(events[-1], Finished)
    assert phone.runtime is session


async def test_cancel_api_ends_the_stream_with_reason_cancelled(lab: SimLab, phone: Phone) -> None:
    with knobs(sim_of(lab, phone), speed=1):
        events = []
        async for ev in phone.generate(params("k1", 200)):
            events.append(ev)
            if isinstance(ev, Tokens):
                await phone.cancel("k1")
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason == "cancelled"
    assert fin.completion_tokens < 200
    assert phone.state is PhoneState.READY


async def test_second_request_on_a_busy_phone_is_refused(lab: SimLab, phone: Phone) -> None:
    with knobs(sim_of(lab, phone), speed=1):
        agen = phone.generate(params("b1", 50))
        assert isinstance(await anext(agen), Started)
        with pytest.raises(PhoneBusy):
            await collect(phone.generate(params("b2", 1)))
        await agen.aclose()
    assert phone.state is PhoneState.READY


async def test_garbage_stdout_line_is_logged_and_skipped(
    lab: SimLab, phone: Phone, caplog: pytest.LogCaptureFixture
) -> None:
    with knobs(sim_of(lab, phone), garbage=True), caplog.at_level(logging.WARNING):
        events = await collect(phone.generate(params("g1", 5)))
    assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 5
    assert any("garbage" in r.getMessage() for r in caplog.records)
    assert phone.state is PhoneState.READY


async def test_phone_error_event_keeps_the_session(phone: Phone) -> None:
    session = phone.runtime
    with pytest.raises(PhoneRequestError, match="bad_request"):
        await collect(phone.generate(params("x1", 2, prompt=[10**8])))  # outside the vocabulary
    assert phone.state is PhoneState.READY and phone.runtime is session
    events = await collect(phone.generate(params("x2", 2)))
    assert isinstance(events[-1], Finished)


async def test_context_overflow_from_the_phone_is_context_length_exceeded(phone: Phone) -> None:
    await collect(phone.generate(params("o1", 4, prompt=list(range(1000, 2000)))))
    # continuing the conversation (reset false) past 1024 tokens: only the phone knows
    with pytest.raises(ContextLengthExceeded):
        await collect(phone.generate(params("o2", 4, prompt=list(range(100, 200)), reset=False)))
    assert phone.state is PhoneState.READY


async def test_too_long_prompt_and_wrong_model_are_refused_before_the_phone(phone: Phone) -> None:
    with pytest.raises(ContextLengthExceeded):
        await collect(phone.generate(params("l1", 4, prompt=[1] * 1024)))
    with pytest.raises(ModelNotFound):
        await collect(phone.generate(GenerationParams("m1", "other-model", [1], 1)))
    assert phone.state is PhoneState.READY


async def test_reset_false_continues_from_the_previous_state(phone: Phone) -> None:
    await collect(phone.generate(params("s1", 3)))
    events = await collect(phone.generate(params("s2", 3, prompt=[11], reset=False)))
    assert isinstance(events[0], Started) and events[0].state_tokens == 4 + 3


async def test_ping_round_trip(phone: Phone) -> None:
    rtt = await phone.ping()
    assert rtt is not None and rtt < 1.0


# --------------------------------------------------------------------------- faults (fault_phone)


async def test_crash_after_n_tokens_is_phone_lost_and_the_session_restarts(
    lab: SimLab, fault_phone: Phone
) -> None:
    await wait_state(fault_phone, PhoneState.READY)
    tokens = 0
    with knobs(sim_of(lab, fault_phone), crash_after=3), pytest.raises(PhoneLost, match="134"):
        async for ev in fault_phone.generate(params("cr1", 50)):
            if isinstance(ev, Tokens):
                tokens += len(ev.ids)
    assert tokens == 3
    assert "134" in (fault_phone.health()[0].last_error or "")
    await wait_state(fault_phone, PhoneState.READY)
    events = await collect(fault_phone.generate(params("cr2", 4)))
    assert isinstance(events[-1], Finished)


async def test_hang_is_a_stall_and_the_session_restarts(lab: SimLab, fault_phone: Phone) -> None:
    await wait_state(fault_phone, PhoneState.READY)
    stall = fault_phone.settings.stall_timeout_s
    session = fault_phone.runtime
    t0 = time.monotonic()
    with knobs(sim_of(lab, fault_phone), hang=True):
        with pytest.raises(PhoneStalled):
            await collect(fault_phone.generate(params("h1", 50)))
        elapsed = time.monotonic() - t0
    assert stall <= elapsed < stall + 2
    await wait_state(fault_phone, PhoneState.READY)
    assert fault_phone.runtime is not session
    events = await collect(fault_phone.generate(params("h2", 4)))
    assert isinstance(events[-1], Finished)


async def test_link_dropped_mid_stream_is_phone_lost_not_a_hang(lab: SimLab, fault_phone: Phone) -> None:
    await wait_state(fault_phone, PhoneState.READY)
    sim = sim_of(lab, fault_phone)
    t0 = time.monotonic()
    with knobs(sim, speed=1):
        with pytest.raises(PhoneLost):
            async for ev in fault_phone.generate(params("d1", 100)):
                if isinstance(ev, Tokens):
                    t0 = time.monotonic()
                    await asyncio.to_thread(sim.drop_connections)
        assert time.monotonic() - t0 < 1.0
        # the adb server reconnects the phone; the phone gets a new session
        await wait_state(fault_phone, PhoneState.READY)
        events = await collect(fault_phone.generate(params("d2", 2)))
    assert isinstance(events[-1], Finished)


async def test_cancel_ignored_by_a_hung_phone_restarts_the_session(lab: SimLab, fault_phone: Phone) -> None:
    await wait_state(fault_phone, PhoneState.READY)
    session = fault_phone.runtime
    with knobs(sim_of(lab, fault_phone), speed=1):
        agen = fault_phone.generate(params("ci1", 100))
        async for ev in agen:
            if isinstance(ev, Tokens):
                break
        sim_of(lab, fault_phone).configure(hang=True)  # from the next token on, cancel is ignored
        await asyncio.sleep(0.5)  # > the runtime's knob re-read + one token time at speed 1
        t0 = time.monotonic()
        await agen.aclose()
        assert time.monotonic() - t0 < fault_phone.settings.cancel_timeout_s + 1
    assert fault_phone.state is not PhoneState.BUSY
    await wait_state(fault_phone, PhoneState.READY)
    assert fault_phone.runtime is not session
