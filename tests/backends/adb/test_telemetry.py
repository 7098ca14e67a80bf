"""A phone's health (server/backends/adb/telemetry.py): the drain decision and its hysteresis, the
measured decode rate, and polling a simulated phone through the real adb server, off the request path:
a phone's health shows in its row, a change of the drain decision tells the scheduler once, and a poll
that fails keeps the last reading."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.api.metrics import PhoneHealthCollector
from server.backends.adb.dumpsys import BatteryReading, Sensor, ThermalReading, ThermalStatus
from server.backends.adb.phone import Phone
from server.backends.adb.telemetry import DecodeRate, DrainPolicy, HealthReading, PhoneTelemetry
from server.backends.base import Finished, GenerationParams, PhoneCondition
from server.scheduling.pool import PhonePool
from server.settings import Settings
from server.sim.harness import SimLab
from tests.scheduling.pool_doubles import DoublePhone, make_pool, run

SETTINGS = Settings(sim=0)  # drain at SEVERE, back at MODERATE; battery floor 15 %, back at 20 %


def reading(status: int | None = None, temp: float | None = None, level: float | None = None,
            charging: bool | None = None) -> HealthReading:
    thermal = ThermalReading(ThermalStatus(status) if status is not None else None)
    if temp is not None:
        thermal = ThermalReading(thermal.status, (Sensor("skin", 3, temp),))
    battery_status = None if charging is None else 2 if charging else 3
    return HealthReading(thermal, BatteryReading(level_pct=level, status=battery_status))


def test_a_hot_phone_is_drained_from_severe_until_moderate_and_each_change_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    policy = DrainPolicy(SETTINGS, "p")
    with caplog.at_level(logging.WARNING, "server.backends.adb.telemetry"):
        changes = [policy.update(reading(s, 40.0 + s)) for s in (0, 2, 3, 4, 3, 3, 2, 2, 3)]
    assert changes == [False, False, True, False, False, False, True, False, True]
    assert policy.reason == "thermal"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "thermal status SEVERE (43.0 °C): no new requests until it is back at MODERATE or below" in lines[0]
    assert "MODERATE (42.0 °C): takes new requests again" in lines[1]


def test_a_low_battery_drains_only_while_not_charging_and_until_the_resume_level() -> None:
    policy = DrainPolicy(SETTINGS, "p")
    assert not policy.update(reading(level=10, charging=True))  # low but charging: fine
    assert policy.update(reading(level=14, charging=False)) and policy.reason == "battery"
    assert not policy.update(reading(level=18, charging=False))  # above the floor, below the resume level
    assert policy.update(reading(level=18, charging=True)) and policy.reason is None  # charging: back
    assert policy.update(reading(level=5, charging=False))
    assert policy.update(reading(level=20, charging=False)) and policy.reason is None


def test_unknown_values_change_nothing_and_heat_outranks_the_battery() -> None:
    policy = DrainPolicy(SETTINGS, "p")
    assert not policy.update(reading(level=3, charging=None))  # not said whether it charges: not drained
    policy.update(reading(3, level=3, charging=False))
    assert policy.reason == "thermal"
    assert not policy.update(reading())  # a poll with nothing readable: still drained
    policy.update(reading(1))
    assert policy.reason == "battery"


def test_with_thermal_routing_off_nothing_is_ever_drained() -> None:
    policy = DrainPolicy(SETTINGS, "p", enabled=False)
    assert not policy.update(reading(6, 60.0, level=1, charging=False)) and policy.reason is None


def test_a_single_threshold_moved_past_its_partner_moves_the_partner_along() -> None:
    low_drain = DrainPolicy(Settings(sim=0, thermal_drain_status=1), "p")  # resume (2) follows: 0
    assert low_drain.update(reading(1)) and not low_drain.update(reading(1)) and low_drain.update(reading(0))
    high_floor = DrainPolicy(Settings(sim=0, battery_floor_pct=50), "p")  # resume (20) follows: 50
    assert high_floor.update(reading(level=49, charging=False))
    assert not high_floor.update(reading(level=49.9, charging=False)) and high_floor.update(reading(level=50))


def test_drain_thresholds_are_settings() -> None:
    strict = Settings(sim=0, thermal_drain_status=2, thermal_resume_status=0, battery_floor_pct=50,
                      battery_resume_pct=60)
    policy = DrainPolicy(strict, "p")
    assert policy.update(reading(2)) and not policy.update(reading(1)) and policy.update(reading(0))
    assert policy.update(reading(level=45, charging=False)) and policy.reason == "battery"


def test_decode_rate_is_over_the_requests_of_the_window() -> None:
    now = [0.0]
    rate = DecodeRate(60.0, clock=lambda: now[0])
    assert rate.tps() is None
    rate.add(100, 5000.0)  # 20 tok/s
    now[0] = 30.0
    rate.add(50, 5000.0)  # 10 tok/s: 150 tokens in 10 s over the window
    assert rate.tps() == 15.0
    now[0] = 70.0  # the first fell out of the window
    assert rate.tps() == 10.0
    rate.add(0, 1000.0)
    rate.add(5, 0.0)  # nothing decoded, or no time: not a sample
    now[0] = 200.0
    assert rate.tps() is None


async def test_a_phone_reads_its_health_and_the_scheduler_hears_of_a_drain_once(
        lab: SimLab, make_phone: Callable[..., Awaitable[Phone]]) -> None:
    sim = await asyncio.to_thread(lab.add_phone)
    await asyncio.to_thread(sim.configure, temp_c=45.0, battery_pct=64)
    phone = await make_phone(sim, telemetry_poll_s=0.05)
    heard: list[str | None] = []
    phone.on_change = lambda p: heard.append(p.condition.drained)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while phone.health()[0].drained != "thermal":
        assert loop.time() < deadline, phone.health()
        await asyncio.sleep(0.02)
    row = phone.health()[0]
    assert (row.thermal_status, row.temperature_c, row.battery_level, row.charging) == (3, 45.0, 64.0, True)
    assert row.telemetry_age_s is not None and row.telemetry_error is None
    assert phone.condition.thermal_status == 3 and phone.condition.drained == "thermal"
    await asyncio.to_thread(sim.configure, temp_c=40.0)
    while phone.condition.drained is not None:
        assert loop.time() < deadline, phone.health()
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # several more polls at the same status
    assert heard.count(None) == 1  # told once, on the change (not once per poll)


async def test_a_failed_poll_keeps_the_last_reading_and_says_why(
        lab: SimLab, make_phone: Callable[..., Awaitable[Phone]]) -> None:
    sim = await asyncio.to_thread(lab.add_phone)
    phone = await make_phone(sim, telemetry_poll_s=3600)  # the first poll only; the test polls itself
    await phone.telemetry.poll()
    assert phone.health()[0].temperature_c == 25.0
    await asyncio.to_thread(sim.refuse_connections, True)
    await asyncio.to_thread(sim.drop_connections)
    try:
        await phone.telemetry.poll()
        row = phone.health()[0]
        assert row.telemetry_error and row.temperature_c == 25.0
    finally:
        await asyncio.to_thread(sim.refuse_connections, False)


async def test_the_decode_rate_of_a_phone_shows_in_its_row(make_phone: Callable[..., Awaitable[Phone]]) -> None:
    phone = await make_phone(telemetry_poll_s=0)
    assert phone.health()[0].decode_tps is None
    params = GenerationParams(request_id="rate-1", model=phone.model.name if phone.model else "", prompt_ids=[1, 2],
                              max_new=8)
    async for _ in phone.generate(params):
        pass
    assert phone.health()[0].decode_tps is not None and phone.health()[0].telemetry_age_s is None


@pytest.mark.parametrize(("script", "error", "timeout"), [
    # a dumpsys that never stops talking: cut at OUTPUT_MAX, read well within the timeout (without the
    # cut it would run into it)
    ("yes 'Thermal Status: 9 level: 5'", False, 20.0),
    ("exec sleep 600", True, 2.0),  # one that never answers: the poll times out
], ids=["endless-output", "hung"])
async def test_a_broken_dumpsys_never_holds_up_a_request_nor_floods_the_host(
        lab: SimLab, make_phone: Callable[..., Awaitable[Phone]], script: str, error: bool, timeout: float) -> None:
    sim = await asyncio.to_thread(lab.add_phone)
    dumpsys = sim.sandbox / "system/bin/dumpsys"
    dumpsys.write_text(f"#!/bin/sh\n{script}\n")
    phone = await make_phone(sim, telemetry_poll_s=3600, adb_timeout_s=timeout)
    poll = asyncio.ensure_future(phone.telemetry.poll())
    params = GenerationParams(request_id="while-polling", model=phone.model.name if phone.model else "",
                              prompt_ids=[1, 2], max_new=8)
    events = [ev async for ev in phone.generate(params)]  # the poll's stream is not the request's
    assert isinstance(events[-1], Finished)  # served, whatever the poll is doing
    await asyncio.wait_for(poll, timeout + 10)
    row = phone.health()[0]
    assert (row.telemetry_error is not None) is error
    assert row.thermal_status is None and row.battery_level is None and row.drained is None


# -- what routing weighs is announced: a pool over in-process phones whose health is a real
# PhoneTelemetry (fed readings by the test), wired as a Phone wires it (on_change -> the pool)

@dataclasses.dataclass(eq=False)
class TelemetryPhone(DoublePhone):
    """A phone double whose condition is its PhoneTelemetry's, which tells the pool of changes."""

    telemetry: PhoneTelemetry | None = None

    @property  # type: ignore[override]
    def condition(self) -> PhoneCondition:
        return self.telemetry.condition if self.telemetry is not None else PhoneCondition()

    @condition.setter
    def condition(self, _value: PhoneCondition) -> None:
        pass  # the dataclass's default; the telemetry decides


def telemetry_pool(n: int) -> tuple[PhonePool, dict[str, TelemetryPhone]]:
    pool, doubles = make_pool(0, thermal_routing="on", state_reuse="on", route_wait_max_s=60)
    phones = {f"p{i}": TelemetryPhone(f"p{i}", pool) for i in range(n)}
    for key, phone in phones.items():
        phone.telemetry = PhoneTelemetry(None, key, SETTINGS, name=key,  # type: ignore[arg-type]
                                         on_change=lambda p=phone: pool.phone_changed(p))
    doubles.update(phones)
    return pool, phones


async def test_a_phone_cooling_below_another_is_announced_so_no_request_waits_beside_it() -> None:
    # r would rather wait for busy p1 (it holds r's prompt) than process the prompt on slow p0; fast p2
    # is passed over while it runs warmer than p0. When p2 cools below p0, p2 is what ThermalAware shows
    # and r would take it at once: the change must reach the pool, which routes again (before, only a
    # change of the drain decision was announced, and r waited beside p2 until its deadline)
    prompt = list(range(100))
    pool, phones = telemetry_pool(3)
    p0, p1, p2 = phones.values()
    p0.prefill_ms_per_token, p1.prefill_ms_per_token, p2.prefill_ms_per_token = 20.0, 20.0, 1.0
    p1.holds, p1.hold = [prompt], True
    for phone, status, temp in ((p0, 1, 35.0), (p1, 1, 35.0), (p2, 2, 40.0)):
        assert phone.telemetry is not None
        phone.telemetry.take(reading(status, temp))
    pool._service_s["m"] = 1.0  # a request takes a second: p1's wait (1 s) beats p0's prompt (2 s)
    holder = asyncio.ensure_future(run(pool, "holder", prompt_ids=prompt))
    await until(lambda: p1.in_flight == "holder")
    waiting = asyncio.ensure_future(run(pool, "r", prompt_ids=prompt))
    await until(lambda: pool.queue_depth() == 1)
    assert pool.audit() == [] and not waiting.done()  # a deliberate, bounded wait for p1
    assert p2.telemetry is not None
    p2.telemetry.take(reading(0, 25.0))  # p2 now runs coolest
    assert pool.audit() == []
    await asyncio.wait_for(waiting, 5)
    assert p2.served == ["r"]
    p1.release()
    await holder


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5), st.floats(20, 60), st.booleans()),
                      min_size=1, max_size=12))
def test_any_change_of_a_reading_leaves_no_request_beside_a_free_phone_it_would_take(
        steps: list[tuple[int, int, float, bool]]) -> None:
    # the class: whatever a phone's readings do (status, degrees, battery), the pool hears of every
    # change that routing weighs, so that audit() holds after each reading
    async def scenario() -> None:
        prompt = list(range(100))
        pool, phones = telemetry_pool(3)
        p0, p1, p2 = phones.values()
        p0.prefill_ms_per_token, p1.prefill_ms_per_token, p2.prefill_ms_per_token = 20.0, 20.0, 1.0
        p1.holds, p1.hold = [prompt], True
        for phone, status, temp in ((p0, 1, 35.0), (p1, 1, 35.0), (p2, 2, 40.0)):  # r waits for p1 at first
            assert phone.telemetry is not None
            phone.telemetry.take(reading(status, temp, level=80, charging=False))
        pool._service_s["m"] = 1.0
        holder = asyncio.ensure_future(run(pool, "holder", prompt_ids=prompt))
        await until(lambda: p1.in_flight == "holder")
        waiting = asyncio.ensure_future(run(pool, "r", prompt_ids=prompt))
        await asyncio.sleep(0)
        for index, status, temp, low in steps:
            telemetry = list(phones.values())[index].telemetry
            assert telemetry is not None
            telemetry.take(reading(status, round(temp, 1), level=10 if low else 80, charging=False))
            assert pool.audit() == []
            await asyncio.sleep(0)
            assert pool.audit() == []
        p1.release()
        for phone in phones.values():
            assert phone.telemetry is not None
            phone.telemetry.take(reading(0, 25.0, level=80, charging=True))
        await asyncio.wait_for(asyncio.gather(holder, waiting), 5)
        assert pool.audit() == [] and pool.queue_depth() == 0

    asyncio.run(scenario())


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline
        await asyncio.sleep(0.001)


async def test_a_poll_cut_short_by_an_unplug_keeps_the_last_reading(
        lab: SimLab, make_phone: Callable[..., Awaitable[Phone]]) -> None:
    # adb ends the stream cleanly when the phone goes (`adb disconnect`): what arrived before is part of
    # an answer, not a reading (before, it replaced the last one: temperature and battery unknown)
    sim = await asyncio.to_thread(lab.add_phone)
    phone = await make_phone(sim, telemetry_poll_s=3600)
    await phone.telemetry.poll()
    assert phone.health()[0].temperature_c == 25.0
    started = sim.sandbox / "dumpsys-started"
    (sim.sandbox / "system/bin/dumpsys").write_text(
        f"#!/bin/sh\necho 'Thermal Status: 0'\ntouch {started}\nexec sleep 60\n")
    poll = asyncio.ensure_future(phone.telemetry.poll())
    await until(started.exists, timeout=20)
    await asyncio.to_thread(lab.unplug, sim.serial)
    try:
        await asyncio.wait_for(poll, 20)
        row = phone.health()[0]
        assert row.telemetry_error is not None
        assert (row.temperature_c, row.battery_level, row.thermal_status) == (25.0, 100.0, 0)
    finally:
        await phone.stop()


async def test_an_unplugged_phone_forgets_its_readings_and_is_read_afresh_when_back(
        lab: SimLab, make_phone: Callable[..., Awaitable[Phone]]) -> None:
    # an offline phone is not polled: its last reading would only grow stale, shown as current in
    # /metrics (a gauge at 48 °C and drained for as long as it stayed unplugged); back, it is read again
    sim = await asyncio.to_thread(lab.add_phone)
    await asyncio.to_thread(sim.configure, temp_c=48.0)
    phone = await make_phone(sim, telemetry_poll_s=3600)
    await phone.telemetry.poll()
    params = GenerationParams(request_id="before-unplug", model=phone.model.name if phone.model else "",
                              prompt_ids=[1, 2], max_new=8)
    async for _ in phone.generate(params):
        pass
    assert phone.health()[0].drained == "thermal" and phone.health()[0].decode_tps is not None
    await phone.stop("unplugged")
    row = phone.health()[0]
    assert (row.temperature_c, row.thermal_status, row.battery_level, row.drained) == (None, None, None, None)
    assert phone.condition == PhoneCondition()
    gauges = {m.name: [s.value for s in m.samples] for m in PhoneHealthCollector(phone).collect()}
    assert gauges == {"qhx:phone_temperature_celsius": [], "qhx:phone_thermal_status": [],
                      "qhx:phone_battery_level_percent": [], "qhx:phone_battery_charging": [],
                      "qhx:phone_decode_tokens_per_second": [], "qhx:phone_drained": []}
    await phone.start()  # plugged in again, still hot: drained again from its first poll
    await until(lambda: phone.condition.drained == "thermal", timeout=20)
    await phone.stop()
    await asyncio.to_thread(sim.configure, temp_c=25.0)


async def test_polling_outlives_a_poll_that_raises_what_nobody_expected(
        lab: SimLab, make_phone: Callable[..., Awaitable[Phone]], caplog: pytest.LogCaptureFixture) -> None:
    # the poll task is the only thing that ever un-drains a phone: before, one unexpected exception (here
    # from the hook the pool gave it) ended it for good, silently, and the phone stayed as last read
    sim = await asyncio.to_thread(lab.add_phone)
    phone = await make_phone(sim, telemetry_poll_s=0.05)
    telemetry = PhoneTelemetry(phone._client, sim.serial, SETTINGS.model_copy(update={"telemetry_poll_s": 0.05}),
                               name="hooked", on_change=lambda: 1 / 0)
    try:
        with caplog.at_level(logging.ERROR, "server.backends.adb.telemetry"):
            telemetry.start()
            await until(lambda: telemetry.reading is not None, timeout=20)
            await asyncio.to_thread(sim.configure, temp_c=48.0)
            await until(lambda: telemetry.condition.drained == "thermal", timeout=20)
            await asyncio.to_thread(sim.configure, temp_c=30.0)
            await until(lambda: telemetry.condition.drained is None, timeout=20)
        assert any("ZeroDivisionError" in (r.exc_text or "") for r in caplog.records)
    finally:
        await telemetry.stop()
        await phone.stop()
        await asyncio.to_thread(sim.configure, temp_c=25.0)


async def test_unplugging_and_plugging_a_phone_again_leaves_one_poll_task_at_most(
        lab: SimLab, make_phone: Callable[..., Awaitable[Phone]]) -> None:
    # (each stop comes once the poll of the start is over: a stream cancelled while adb opens it can
    # leave its socket to the garbage collector, a transport matter of its own; see the closing note)
    sim = await asyncio.to_thread(lab.add_phone)
    phone = await make_phone(sim, telemetry_poll_s=3600)
    name = f"qhx-telemetry-{phone.key}"

    def polling() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_name() == name and not t.done())

    for _ in range(3):
        await until(lambda: phone.telemetry.reading is not None, timeout=20)
        assert polling() == 1
        await phone.start()  # started twice: still one
        assert polling() == 1
        await phone.stop("unplugged")
        assert polling() == 0 and phone.telemetry.reading is None
        await phone.start()
    await until(lambda: phone.telemetry.reading is not None, timeout=20)
    await phone.stop()
    assert polling() == 0
