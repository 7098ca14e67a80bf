"""The simulated phone's body (server/sim/physics.py): temperature and battery under work and rest, the
thermal status and throttle they drive, the knobs that set them, and the engine slowing down with it.

The model is tested as functions of explicit times (no sleeping); the engine test bounds a decode time
from below only (sleeps never end early), so a loaded machine cannot fail it.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.sim.engine import Engine, GenRequest
from server.sim.generation import TextModel
from server.sim.physics import (
    HEALTH_JSON,
    KNOB_DEFAULTS,
    LEASE_S,
    Body,
    PhoneBody,
    Work,
    advance,
    read_knobs,
    thermal_status,
    throttle,
)
from server.sim.simconfig import DEFAULTS, SimConfig, SimConfigWatcher, write_sim_config
from server.sim.vocab import load_tokenizer

CFG = SimConfig()  # defaults: 25 °C room, +15 °C under load, tau 300 s, speed 1


def body(temp: float = 25.0, battery: float = 100.0, working_until: float = 0.0) -> Body:
    return Body(0.0, temp, battery, working_until)


def test_work_heats_the_phone_towards_room_plus_rise_and_rest_cools_it_back() -> None:
    hot = advance(body(working_until=math.inf), CFG, 3000.0)  # ten time constants of work
    assert hot.temp_c == pytest.approx(CFG.ambient_c + CFG.thermal_rise_c, abs=0.01)
    one_tau = advance(body(working_until=math.inf), CFG, CFG.thermal_tau_s)
    assert one_tau.temp_c == pytest.approx(25 + 15 * (1 - math.exp(-1)), abs=0.01)
    cooled = advance(hot._replace(t=0.0, working_until=0.0), CFG, 3000.0)
    assert cooled.temp_c == pytest.approx(CFG.ambient_c, abs=0.01)


def test_work_ends_with_its_lease_and_the_phone_cools_from_then() -> None:
    worked = advance(body(working_until=100.0), CFG, 200.0)  # 100 s of work, then 100 s idle
    peak = advance(body(working_until=100.0), CFG, 100.0).temp_c
    assert 25 < worked.temp_c < peak


def test_speed_scales_time_and_speed_zero_freezes_the_body() -> None:
    fast = dataclasses.replace(CFG, speed=10.0)
    assert advance(body(working_until=math.inf), fast, 30.0).temp_c == pytest.approx(
        advance(body(working_until=math.inf), CFG, 300.0).temp_c)
    frozen = dataclasses.replace(CFG, speed=0.0)
    assert advance(body(48.0, 40.0, math.inf), frozen, 1e6) == body(48.0, 40.0, math.inf)._replace(t=1e6)


@given(temp=st.floats(-40, 150), t1=st.floats(0, 1e5), t2=st.floats(0, 1e5), working=st.booleans())
def test_advancing_in_two_steps_is_advancing_once(temp: float, t1: float, t2: float, working: bool) -> None:
    start = body(temp, 50.0, 1e9 if working else 0.0)
    a, b = sorted((t1, t2))
    once = advance(start, CFG, b)
    twice = advance(advance(start, CFG, a), CFG, b)
    assert twice.temp_c == pytest.approx(once.temp_c, abs=1e-6)
    assert twice.battery_pct == pytest.approx(once.battery_pct, abs=1e-6)
    low, high = sorted((temp, 25.0 + (15.0 if working else 0.0)))
    assert low - 1e-9 <= once.temp_c <= high + 1e-9  # never past where it is heading


def test_battery_drains_under_load_unless_charging_and_stays_within_0_and_100() -> None:
    unplugged = dataclasses.replace(CFG, charging=False)
    drained = advance(body(battery=50.0, working_until=math.inf), unplugged, 600.0)  # 10 min at 0.5 %/min
    assert drained.battery_pct == pytest.approx(45.0)
    idle = advance(body(battery=50.0), unplugged, 600.0)
    assert idle.battery_pct == pytest.approx(49.5)  # a tenth of the drain
    assert advance(body(battery=1.0, working_until=math.inf), unplugged, 1e6).battery_pct == 0.0
    charging = advance(body(battery=50.0, working_until=math.inf), CFG, 600.0)
    assert charging.battery_pct == pytest.approx(55.0)  # +1.0 - 0.5 per minute
    assert advance(body(battery=99.0), CFG, 1e6).battery_pct == 100.0


def test_thermal_status_follows_the_thresholds_and_throttle_the_curve() -> None:
    assert [thermal_status(t, CFG) for t in (25, 38, 40.9, 41, 44, 47, 50, 53, 90)] == [0, 1, 1, 2, 3, 4, 5, 6, 6]
    assert throttle(30.0, CFG) == 1.0 and throttle(42.0, CFG) == 1.0
    assert throttle(43.0, CFG) == pytest.approx(0.775)  # halfway between 1.0 at 42 and 0.55 at 44
    assert throttle(44.0, CFG) == pytest.approx(0.55) and throttle(99.0, CFG) == pytest.approx(0.15)
    assert throttle(50.0, dataclasses.replace(CFG, throttle_curve=())) == 1.0


def test_curve_and_thresholds_are_checked_when_written(tmp_path: Path) -> None:
    write_sim_config(tmp_path, {"throttle_curve": [[30, 1], [40, 0.5]], "thermal_status_c": [30, 35]})
    cfg = SimConfigWatcher(tmp_path / "sim.json").current()
    assert cfg.throttle_curve == ((30.0, 1.0), (40.0, 0.5)) and thermal_status(36, cfg) == 2
    for bad in ({"throttle_curve": [[40, 0]]}, {"throttle_curve": [40, 1]}, {"throttle_curve": "hot"},
                {"thermal_status_c": [40, 30]}, {"thermal_status_c": [1, 2, 3, 4, 5, 6, 7]},
                {"temp_c": 500}, {"battery_pct": -1}, {"temp_c": True}):
        with pytest.raises(ValueError):
            write_sim_config(tmp_path, bad)


def test_temp_and_battery_knobs_set_the_body_once_and_are_not_kept(tmp_path: Path) -> None:
    data = write_sim_config(tmp_path, {"speed": 0, "temp_c": 48.5, "battery_pct": 9})
    assert "temp_c" not in data and "temp_c" not in (tmp_path / "sim.json").read_text()
    phone = PhoneBody(tmp_path)
    assert (phone.now().temp_c, phone.now().battery_pct) == (48.5, 9.0)
    write_sim_config(tmp_path, {"hang": False})  # another knob later does not set the body again
    phone.set(temp_c=30.0)
    write_sim_config(tmp_path, {"hang": False})
    assert phone.now().temp_c == 30.0
    write_sim_config(tmp_path, {"temp_c": 48.5})  # the same value again is a new event
    assert phone.now().temp_c == 48.5


def test_the_knobs_the_body_reads_cheaply_are_the_simulators_knobs(tmp_path: Path) -> None:
    assert KNOB_DEFAULTS == {k: DEFAULTS[k] for k in KNOB_DEFAULTS}
    write_sim_config(tmp_path, {"speed": "max", "ambient_c": 31, "throttle_curve": [[45, 0.5], [40, 1]]})
    full, cheap = SimConfigWatcher(tmp_path / "sim.json").current(), read_knobs(tmp_path / "sim.json")
    assert {k: getattr(cheap, k) for k in KNOB_DEFAULTS} == {k: getattr(full, k) for k in KNOB_DEFAULTS}
    (tmp_path / "sim.json").write_text('{"throttle_curve": "hot", "ambient_c": 30}')  # a bad hand edit
    assert read_knobs(tmp_path / "sim.json").ambient_c == 25.0  # the defaults, not an error


def test_the_simulated_dumpsys_starts_without_dataclasses_or_simconfig() -> None:
    # it runs as a process per call (twice per health poll per phone): its imports are its cost
    root = str(Path(__file__).resolve().parents[2])
    code = ("import sys; sys.path.insert(0, %r); import server.sim.dumpsys; "
            "print(sorted(m for m in ('dataclasses', 'server.sim.simconfig', 'tempfile') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code % root], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_phone_without_health_json_is_rested_and_an_unreadable_one_counts_as_rested(tmp_path: Path) -> None:
    write_sim_config(tmp_path, {"ambient_c": 30})
    phone = PhoneBody(tmp_path)
    assert (phone.now().temp_c, phone.now().battery_pct) == (30.0, 100.0)
    (tmp_path / HEALTH_JSON).write_text("{not json")
    assert phone.now().temp_c == 30.0


def test_work_holds_a_lease_that_lapses_when_its_holder_dies(tmp_path: Path) -> None:
    write_sim_config(tmp_path, {"speed": 0})
    phone = PhoneBody(tmp_path)
    with Work(phone):
        assert phone.now().working(time.time())
    assert not phone.now().working(time.time())  # ended with the request
    work = Work(phone).__enter__()  # a runtime that crashes never exits its work
    until = phone.now().working_until
    assert time.time() < until <= time.time() + LEASE_S
    del work


def test_concurrent_writers_never_lose_an_update(tmp_path: Path) -> None:
    write_sim_config(tmp_path, {"speed": 0})
    phone = PhoneBody(tmp_path)
    phone.set(battery_pct=0)

    def bump() -> None:
        for _ in range(25):
            phone.update(lambda b: b._replace(battery_pct=b.battery_pct + 1))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert phone.now().battery_pct == 100.0


@pytest.fixture(scope="module")
def model() -> TextModel:
    return TextModel(load_tokenizer())


def decode_ms(model: TextModel, folder: Path, **knobs: Any) -> float:
    write_sim_config(folder, {"speed": 1, "decode_tps": 1000, "stop_rate": 0.0, **knobs})
    watcher = SimConfigWatcher(folder / "sim.json")
    engine = Engine(model, watcher, precision="fp16", max_context=1024, body=PhoneBody(folder, watcher))
    req = GenRequest(id="r", prompt_ids=[1, 2, 3], max_new=60)
    engine.check(req)
    return engine.run(req, lambda _t, _ms: None).decode_ms


def test_a_hot_phone_decodes_slower_by_the_curve(model: TextModel, tmp_path: Path) -> None:
    # cold: 60 tokens at 1 ms; at 47 °C the curve leaves 0.35 of the rate: at least 60 / 0.35 ms
    hot = decode_ms(model, tmp_path, temp_c=47.0, thermal_tau_s=1e9)  # too slow to cool meanwhile
    assert hot >= 0.95 * 60 / 0.35
    assert not PhoneBody(tmp_path).now().working(time.time())  # the request's work ended with it
