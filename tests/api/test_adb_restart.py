"""The adb server that the phones are reached through dies and comes back (the real adb binary,
killed and started again on its port): qhx-server finds the phones again and serves, without a
restart of its own, and ``/ready`` says so meanwhile. Requests caught by the outage end in a clean
OpenAI error, never a hang or a 500.

Two ways back: the lab's watchdog starts the adb server again at once (as a supervisor such as systemd
would, only faster than a device poll), or it stays down for a while (several polls) and is started
by hand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from live_server import BASE_KNOBS, ServerThread, wait_ready

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab

PHONES = 2


@pytest.fixture(scope="module")
def lab() -> Iterator[SimLab]:
    with SimLab(phones=PHONES, speed=0, sim_config=BASE_KNOBS, supervise_adb=False) as lab:
        yield lab


@pytest.fixture(scope="module")
def base_url(lab: SimLab) -> Iterator[str]:
    settings = Settings(adb_servers=[lab.adb_server], sim=0, device_poll_s=0.25, quarantine_s=0.5,
                        quarantine_max_s=1.0, stall_timeout_s=5.0)
    with ServerThread(create_app(settings)) as st:
        base = f"http://127.0.0.1:{st.port}"
        wait_ready(base)
        yield base


def ready(base_url: str) -> tuple[int, list[str]]:
    r = httpx.get(base_url + "/ready", timeout=5)
    return r.status_code, [p["state"] for p in r.json()["phones"]]


def wait_for(what: str, predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def all_ready(base_url: str) -> bool:
    status, states = ready(base_url)
    return status == 200 and states == ["ready"] * PHONES


def serves(base_url: str, n: int = 4) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
    with client:
        for i in range(n):
            out = client.completions.create(model="qwen3.5-0.8b", prompt=f"after {i}", max_tokens=3)
            assert out.choices[0].finish_reason == "length"


class Streamer(threading.Thread):
    """A long stream running while the adb server dies; records how it ended."""

    def __init__(self, base_url: str) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.started_tokens = threading.Event()
        self.outcome: str | None = None

    def run(self) -> None:
        client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
        try:
            with client:
                stream = client.completions.create(model="qwen3.5-0.8b", prompt="long", max_tokens=1000,
                                                   stream=True)
                for _ in stream:
                    self.started_tokens.set()
            self.outcome = "completed"
        except openai.APIError as e:  # an error event in the stream, or a status
            self.outcome = f"error: {type(e).__name__}: {e}"
        finally:
            self.started_tokens.set()


def test_phones_are_found_again_when_the_adb_server_is_restarted_at_once(lab: SimLab, base_url: str) -> None:
    wait_for("both phones ready", lambda: all_ready(base_url))
    for phone in lab.phones:
        phone.configure(speed=1)  # a stream long enough to be cut by the kill
    try:
        streamer = Streamer(base_url)
        streamer.start()
        assert streamer.started_tokens.wait(20)
        lab.kill_adb_server()
        lab.restart_adb_server()  # what the lab's watchdog (or systemd) does, before any device poll
        streamer.join(30)
        assert not streamer.is_alive(), "the stream caught by the adb restart hung"
        assert streamer.outcome is not None and streamer.outcome.startswith("error: "), streamer.outcome
        assert "500" not in streamer.outcome and "Traceback" not in streamer.outcome
    finally:
        for phone in lab.phones:
            phone.configure(speed=0)
    wait_for("both phones ready again", lambda: all_ready(base_url))
    serves(base_url)


def devices(base_url: str) -> list[dict[str, Any]]:
    return list(httpx.get(base_url + "/v1/devices", timeout=5).json()["data"])


def test_adb_restarts_are_not_counted_against_the_phones(lab: SimLab, base_url: str) -> None:
    # A lost adb server ends every session on it; counted as the phones' failures, two quick restarts
    # in a row (no request in between to reset the count) quarantined every phone.
    for _ in range(2):
        wait_for("both phones ready", lambda: all_ready(base_url))
        lab.kill_adb_server()
        lab.restart_adb_server()
        wait_for("both phones offline or restarting",
                 lambda: all(d["state"] != "ready" or d["uptime_s"] < 5 for d in devices(base_url)))
    wait_for("both phones ready again", lambda: all_ready(base_url))
    assert [(d["failures"], d["retry_in_s"]) for d in devices(base_url)] == [(0, None)] * PHONES


def test_tcp_phones_a_restarted_adb_server_forgot_are_connected_again(lab: SimLab, base_url: str) -> None:
    wait_for("both phones ready", lambda: all_ready(base_url))
    lab.kill_adb_server()
    lab.restart_adb_server(connect=False)  # a new adb server that knows no phone over TCP
    wait_for("both phones ready again (qhx-server ran adb connect)", lambda: all_ready(base_url))
    serves(base_url)


def test_ready_says_503_while_the_adb_server_is_down_and_200_once_it_is_back(lab: SimLab, base_url: str) -> None:
    wait_for("both phones ready", lambda: all_ready(base_url))
    lab.kill_adb_server()
    wait_for("/ready 503 with the phones offline", lambda: ready(base_url) == (503, ["offline"] * PHONES))
    r = httpx.post(base_url + "/v1/completions", json={"model": "qwen3.5-0.8b", "prompt": "x", "max_tokens": 2},
                   timeout=10)
    assert r.status_code == 503, r.text  # no phone now; the model was served and may come back
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    time.sleep(1.0)  # several device polls against a dead adb server
    assert ready(base_url)[0] == 503
    lab.restart_adb_server()
    wait_for("both phones ready again", lambda: all_ready(base_url))
    serves(base_url)


def test_a_tcp_phone_out_of_reach_when_the_adb_server_came_back_is_connected_once_it_is_back(
    lab: SimLab, base_url: str
) -> None:
    # qhx-server ran `adb connect` once, when the adb server came back: a phone out of reach at that
    # moment (rebooting, Wi-Fi down) was never served again, and after a second restart not even tried
    wait_for("both phones ready", lambda: all_ready(base_url))
    away = lab.phones[0]
    lab.kill_adb_server()
    away.stop()  # its adbd stops listening: adb connect is refused
    lab.restart_adb_server(connect=False)
    wait_for("the other phone ready again",
             lambda: {d["serial"]: d["state"] for d in devices(base_url)}.get(lab.phones[1].serial) == "ready")
    lab.kill_adb_server()  # a second restart while it is still away
    lab.restart_adb_server(connect=False)
    wait_for("the other phone ready again",
             lambda: {d["serial"]: d["state"] for d in devices(base_url)}.get(lab.phones[1].serial) == "ready")
    away.plug()  # back on the network; no one runs adb connect but qhx-server
    wait_for("both phones ready again", lambda: all_ready(base_url), timeout=60)
    serves(base_url)
