"""Phone health end to end: the official client -> uvicorn -> the pool -> a real adb server -> two
simulated phones whose temperature and battery a test sets (sim knobs ``temp_c``, ``battery_pct``,
``charging``). A phone started hot gets no new requests until it cools, then gets them again; a low
battery while not charging drains a phone the same way; a throttled phone's measured rate drops in
/v1/devices; /metrics carries the gauges; each drain and recovery is logged once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab, SimPhone
from tests.api.live_server import BASE_KNOBS, LiveServer, ServerThread, wait_ready

POLL_S = 0.1


@pytest.fixture(scope="module")
def lab() -> Iterator[SimLab]:
    with SimLab(phones=2, speed=0, sim_config=BASE_KNOBS) as lab:
        lab.phones[0].configure(temp_c=48.0)  # started hot: CRITICAL
        yield lab


@pytest.fixture(scope="module")
def live(lab: SimLab) -> Iterator[LiveServer]:
    settings = Settings(adb_servers=[lab.adb_server], sim=0, telemetry_poll_s=POLL_S)
    with ServerThread(create_app(settings)) as st:
        base = f"http://127.0.0.1:{st.port}"
        server = LiveServer(base, wait_ready(base), lab.phones[0], settings)
        yield server
        if server._client is not None:
            server._client.close()


def row(live: LiveServer, sim: SimPhone) -> dict[str, Any]:
    return next(p for p in live.devices() if p["serial"] == sim.serial)


def wait_for(live: LiveServer, sim: SimPhone, check: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        phone = row(live, sim)
        if check(phone):
            return phone
        assert time.monotonic() < deadline, phone
        time.sleep(0.02)


def complete(live: LiveServer, n: int, *, parallel: int = 1) -> None:
    def one(i: int) -> None:
        live.client().completions.create(model=live.model, prompt=f"Tell me about the river {i}", max_tokens=4)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, range(n)))


def test_a_phone_started_hot_gets_no_requests_until_it_cools_then_gets_them_again(
        lab: SimLab, live: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    hot, cool = lab.phones
    with caplog.at_level(logging.WARNING, "server.backends.adb.telemetry"):
        drained = wait_for(live, hot, lambda p: p["drained"] == "thermal")
        assert (drained["thermal_status"], drained["temperature_c"]) == (4, 48.0)
        served = drained["tokens_served"]
        complete(live, 6, parallel=2)  # two at a time: both phones would be busy if both took requests
        assert row(live, hot)["tokens_served"] == served
        assert row(live, cool)["drained"] is None

        hot.configure(temp_c=41.5)  # MODERATE: below SEVERE, at the resume status
        wait_for(live, hot, lambda p: p["drained"] is None and p["thermal_status"] == 2)
        complete(live, 6, parallel=2)
        assert row(live, hot)["tokens_served"] > served
    records = caplog.get_records("setup") + caplog.records  # the server starts (and drains) in the setup
    drains = [r.getMessage() for r in records if hot.serial in r.getMessage() and r.name.endswith("telemetry")]
    assert len(drains) == 2, drains  # once drained, once back: not once per poll
    assert "no new requests" in drains[0] and "takes new requests again" in drains[1]


def test_a_low_battery_not_charging_drains_a_phone_until_it_charges(lab: SimLab, live: LiveServer) -> None:
    low = lab.phones[1]
    lab.phones[0].configure(temp_c=30.0)
    try:
        low.configure(battery_pct=9, charging=False)
        drained = wait_for(live, low, lambda p: p["drained"] == "battery")
        assert (drained["battery_level"], drained["charging"]) == (9.0, False)
        served = drained["tokens_served"]
        complete(live, 4, parallel=2)
        assert row(live, low)["tokens_served"] == served
        low.configure(charging=True)
        wait_for(live, low, lambda p: p["drained"] is None and p["charging"] is True)
    finally:
        low.configure(battery_pct=100, charging=True)


def test_a_throttled_phones_measured_rate_drops_in_v1_devices_and_metrics(lab: SimLab, live: LiveServer) -> None:
    phone = lab.phones[1]
    lab.phones[0].configure(temp_c=48.0)  # out of the way: every request goes to `phone`
    wait_for(live, lab.phones[0], lambda p: p["drained"] == "thermal")
    # real pacing at 200 tok/s; a curve that keeps a tenth of the rate from 35 °C, below any drain
    phone.configure(speed=1, decode_tps=200, thermal_tau_s=1e9, throttle_curve=[[30, 1.0], [35, 0.1]],
                    temp_c=25.0)
    try:
        complete_long(live)
        cold = wait_for(live, phone, lambda p: p["decode_tps"] is not None)["decode_tps"]
        phone.configure(temp_c=40.0)  # LIGHT: still routed to, decoding at a tenth (20 tok/s)
        wait_for(live, phone, lambda p: p["temperature_c"] == 40.0 and p["drained"] is None)
        complete_long(live)  # at least 3 s of decoding
        throttled = row(live, phone)
        assert throttled["decode_tps"] < 0.6 * cold, (cold, throttled)
        assert throttled["last_decode_tps"] <= 21.0
        metrics = httpx.get(live.base_url + "/metrics", timeout=5).text
        assert f'qhx:phone_temperature_celsius{{phone="{phone.serial}"}} 40.0' in metrics
        assert f'qhx:phone_thermal_status{{phone="{phone.serial}"}} 1.0' in metrics
        assert f'qhx:phone_battery_charging{{phone="{phone.serial}"}} 1.0' in metrics
        assert f'qhx:phone_drained{{phone="{lab.phones[0].serial}"}} 1.0' in metrics
        rate = float(metrics.split(f'qhx:phone_decode_tokens_per_second{{phone="{phone.serial}"}} ')[1].split()[0])
        assert rate == throttled["decode_tps"]
    finally:
        phone.configure(speed=0, temp_c=25.0, throttle_curve=[[42, 1.0], [44, 0.55], [47, 0.35], [53, 0.15]],
                        thermal_tau_s=300)
        lab.phones[0].configure(temp_c=25.0)


def complete_long(live: LiveServer) -> None:
    live.client().completions.create(model=live.model, prompt="Write a long story", max_tokens=60)


def test_with_every_phone_drained_ready_says_so_and_a_request_waits_for_one_to_recover(
        lab: SimLab, live: LiveServer) -> None:
    # readiness is "a phone can take a new request now": a balancer sends elsewhere while every phone is
    # too hot (as while they are quarantined). Before, /ready said 200 ready with both phones drained
    hot, other = lab.phones
    try:
        for sim in lab.phones:
            sim.configure(temp_c=48.0)
        for sim in lab.phones:
            wait_for(live, sim, lambda p: p["drained"] == "thermal")
        ready = httpx.get(live.base_url + "/ready", timeout=5)
        assert ready.status_code == 503
        assert ready.json()["status"] == "not_ready"
        assert (ready.json()["phones_ready"], ready.json()["phones_drained"]) == (0, 2)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(complete, live, 1)  # queued, not refused: the phones will cool
            time.sleep(0.5)
            assert not waiting.done()
            other.configure(temp_c=30.0)
            waiting.result(timeout=60)
        assert row(live, hot)["drained"] == "thermal"
        ready = httpx.get(live.base_url + "/ready", timeout=5)
        assert ready.status_code == 200
        assert (ready.json()["status"], ready.json()["phones_ready"], ready.json()["phones_drained"]) == (
            "ready", 1, 1)
    finally:
        for sim in lab.phones:
            sim.configure(temp_c=25.0)
        for sim in lab.phones:
            wait_for(live, sim, lambda p: p["drained"] is None)
