"""GET /v1/devices/events on the real stack: a snapshot at once, then the phone's changes as they happen
(busy, tokens, its decode rate), readable by any SSE client (httpx here)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import BASE_KNOBS, LiveServer, ServerThread, wait_ready

Snapshot = dict[str, Any]
# what changes by itself, written out here rather than taken from the server: a clock added to the
# phones' health without being declared one shows up as news in every tick, and the test below fails
CLOCKS = frozenset({"uptime_s", "retry_in_s", "oldest_wait_s", "live_tps", "telemetry_age_s"})


def snapshots(live: LiveServer, client: httpx.Client) -> Iterator[Snapshot]:
    """The stream's snapshots, as an SSE client reads them (comments and blank lines skipped)."""
    with client.stream("GET", live.base_url + "/v1/devices/events", timeout=httpx.Timeout(10, read=5)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                yield json.loads(line[len("data: "):])


def first_where(stream: Iterator[Snapshot], pred: Callable[[Snapshot], bool], within_s: float) -> Snapshot:
    """The first snapshot that satisfies ``pred``, read for at most ``within_s`` (then it fails)."""
    deadline = time.monotonic() + within_s
    for snap in stream:
        if pred(snap):
            return snap
        assert time.monotonic() < deadline, f"no such snapshot within {within_s} s; last: {snap}"
    raise AssertionError("the stream ended")


def test_first_event_is_the_farm_as_devices_lists_it(live: LiveServer) -> None:
    with httpx.Client() as client:
        snap = next(snapshots(live, client))
    assert snap["object"] == "devices.snapshot" and snap["seq"] >= 1 and snap["time"] > 0
    devices = live.devices()
    assert [p["serial"] for p in snap["data"]] == [p["serial"] for p in devices]
    phone = snap["data"][0]
    assert set(devices[0]) <= set(phone)  # every /v1/devices field, plus what only a watch over time knows
    assert {"live_tps", "tps_history", "last_error_at"} <= set(phone)
    assert snap["queues"] == [{"model": live.model, "waiting": 0, "oldest_wait_s": 0.0, "phones": 1, "serving": 1}]


def test_a_request_shows_as_busy_with_live_tokens_then_its_rate_in_the_history(live: LiveServer,
                                                                                phone_knobs: Any) -> None:
    phone_knobs(speed=1)  # ~22.7 tok/s: 60 tokens take ~2.6 s, several of the watch's 0.5 s ticks
    with httpx.Client() as client:
        stream = snapshots(live, client)
        before = next(stream)["data"][0]
        body = {"model": live.model, "prompt": "Go on", "max_tokens": 60}
        worker = threading.Thread(target=lambda: httpx.post(live.base_url + "/v1/completions", json=body, timeout=60))
        worker.start()
        try:
            busy = first_where(stream, lambda s: s["data"][0]["state"] == "busy", within_s=10)
            assert busy["data"][0]["request_in_flight"].startswith("cmpl-")
            live_rate = first_where(stream, lambda s: s["data"][0]["live_tps"] is not None, within_s=10)
            assert 5 < live_rate["data"][0]["live_tps"] < 60  # about the phone's 22.7 tok/s
            done = first_where(stream, lambda s: s["data"][0]["state"] == "ready", within_s=20)
        finally:
            worker.join(60)
    phone = done["data"][0]
    assert phone["tokens_served"] >= before["tokens_served"] + 60
    assert phone["live_tps"] is None and phone["request_in_flight"] is None
    assert len(phone["tps_history"]) == len(before["tps_history"]) + 1 or len(phone["tps_history"]) == 40
    assert phone["tps_history"][-1] == round(phone["last_decode_tps"], 2)


def test_every_snapshot_sent_carries_news(live: LiveServer) -> None:
    """An idle farm gets pings, and a snapshot only when something changed besides the clocks that run
    by themselves (uptime, countdowns, the age of a telemetry reading): each one differs from the last
    in what matters."""
    live.wait_idle(timeout=10)
    sent: list[Snapshot] = []
    pings = 0
    with httpx.stream("GET", live.base_url + "/v1/devices/events", timeout=10) as r:
        t0 = time.monotonic()
        for line in r.iter_lines():  # a ping every sse_ping_s (0.25 s here) keeps this loop turning
            if line.startswith("data: "):
                sent.append(json.loads(line[len("data: "):]))
            pings += line.startswith(": ping")
            if time.monotonic() - t0 > 1.5:  # three of the watch's ticks
                break
    assert pings >= 2
    news = [stable(s) for s in sent]
    assert all(a != b for a, b in itertools.pairwise(news)), "a snapshot was sent with nothing new in it"
    assert [s["seq"] for s in sent] == list(range(sent[0]["seq"], sent[0]["seq"] + len(sent)))


def stable(snapshot: Snapshot) -> Any:
    return [{k: v for k, v in p.items() if k not in CLOCKS} for p in snapshot["data"]], [
        {k: v for k, v in q.items() if k not in CLOCKS} for q in snapshot["queues"]]


async def test_many_watchers_come_and_go_and_leave_nothing_behind() -> None:
    """40 watchers at once each see a request through, then leave: the server keeps no subscriber and
    its ticking stops (a watcher that left must cost nothing)."""
    with SimLab(phones=1, speed=0, sim_config=BASE_KNOBS) as lab:
        app = create_app(Settings(adb_servers=[lab.adb_server], sim=0, sse_ping_s=0.25))
        with ServerThread(app) as st:
            base = f"http://127.0.0.1:{st.port}"
            model = await asyncio.to_thread(wait_ready, base)
            watch = app.state.device_watch
            start = (await asyncio.to_thread(httpx.get, base + "/v1/devices")).json()["data"][0]["tokens_served"]
            joined = asyncio.Event()
            n_joined = 0

            async def watcher(client: httpx.AsyncClient) -> int:
                nonlocal n_joined
                async with client.stream("GET", base + "/v1/devices/events") as r:
                    n_joined += 1
                    if n_joined == 40:
                        joined.set()
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            served = json.loads(line[len("data: "):])["data"][0]["tokens_served"]
                            if served >= start + 30:
                                return int(served)
                return -1

            async with httpx.AsyncClient(timeout=httpx.Timeout(20), limits=httpx.Limits(max_connections=50)) as client:
                watchers = [asyncio.ensure_future(watcher(client)) for _ in range(40)]
                await asyncio.wait_for(joined.wait(), 20)
                r = await client.post(base + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 30})
                assert r.status_code == 200
                seen = await asyncio.wait_for(asyncio.gather(*watchers), 20)
            assert all(s >= start + 30 for s in seen)
            deadline = time.monotonic() + 5
            while watch.subscribers or not watch._ticker.done():
                assert time.monotonic() < deadline, (watch.subscribers, watch._ticker)
                await asyncio.sleep(0.05)


@contextlib.contextmanager
def serving(args: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``qhx-server serve`` in a process of its own, ready; killed at the end if still running."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--log-level",
                             "warning", *args])
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(base):
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not become ready"
            time.sleep(0.1)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_open_event_stream_does_not_hold_a_shutdown_up() -> None:
    """A console left open on the farm must not keep ``serve`` alive through its grace period (600 s
    here): the stream ends as the drain begins and the server exits as if it were not there."""
    with serving(["--sim", "1", "--shutdown-grace-s", "600"]) as (proc, base):
        with httpx.stream("GET", base + "/v1/devices/events", timeout=30) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rest = list(lines)  # the stream ends by itself
        assert not any(line.startswith('data: {"error"') for line in rest)
        assert proc.wait(timeout=60) == 0
        print(f"serve exited {time.monotonic() - t0:.1f} s after SIGTERM with a watcher connected")


# -- watchers that stop reading -----------------------------------------------------------------


@contextlib.contextmanager
def stuck_watcher(port: int) -> Iterator[socket.socket]:
    """A watcher that asks for the events and never reads them (a laptop asleep with the console
    open): its receive buffer is small, so what the server sends it piles up on the server's side."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /v1/devices/events HTTP/1.1\r\nHost: qhx\r\nAccept: text/event-stream\r\n\r\n")
    try:
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def busy_farm(base: str, model: str, workers: int = 2) -> Iterator[None]:
    """Short requests back to back: the farm changes several times a second, and so do the snapshots."""
    stop = threading.Event()

    def work() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                client.post(base + "/v1/completions", json={"model": model, "prompt": "Go on", "max_tokens": 12})

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def read_to_the_end(sock: socket.socket, limit: int) -> int:
    """Bytes read until the server closed or reset the connection (at most ``limit``)."""
    sock.settimeout(30)
    received = 0
    with contextlib.suppress(ConnectionResetError):
        while received < limit and (data := sock.recv(65536)):
            received += len(data)
    return received


def test_a_watcher_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    """A watcher that stopped reading was never let go: its snapshots piled up in the kernel (megabytes:
    Linux grows a socket's buffer as it sees fit) for as long as it stayed connected. Now its buffers
    are bounded and a send that waits ``write_timeout_s`` drops it, as a generation stream's."""
    with SimLab(phones=2, speed=0, sim_config=BASE_KNOBS) as lab:
        app = create_app(Settings(adb_servers=[lab.adb_server], sim=0, sse_ping_s=0.25, write_timeout_s=1.0))
        with ServerThread(app) as st:
            base = f"http://127.0.0.1:{st.port}"
            model = wait_ready(base)
            watch = app.state.device_watch
            with stuck_watcher(st.port) as sock:
                deadline = time.monotonic() + 10
                while watch.subscribers < 1:
                    assert time.monotonic() < deadline, "the watcher never subscribed"
                    time.sleep(0.02)
                with busy_farm(base, model):
                    deadline = time.monotonic() + 90
                    while watch.subscribers:
                        assert time.monotonic() < deadline, "a watcher that reads nothing is still served"
                        time.sleep(0.1)
                received = read_to_the_end(sock, limit=16 << 20)
    assert 0 < received < 512 * 1024, received  # what the bounded buffers held for it, then the end


def test_a_watcher_that_stops_reading_does_not_hold_a_shutdown_up() -> None:
    """The stream ends when a shutdown begins, at the watch's next tick; but a stream stuck in a send
    to a client that stopped reading never got there, and serve waited its whole grace period (600 s
    here) with nothing in flight. Now it is dropped."""
    args = ["--sim", "2", "--sim-speed", "0", "--shutdown-grace-s", "600", "--write-timeout-s", "600"]
    with serving(args) as (proc, base):
        model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        port = int(base.rsplit(":", 1)[1])
        with stuck_watcher(port), httpx.stream("GET", base + "/v1/devices/events", timeout=30) as r:
            # a watcher that reads: once it has had far more than the stuck one's buffers hold, the
            # stuck one waits in a send
            lines = r.iter_lines()
            seen = 0
            with busy_farm(base, model):
                deadline = time.monotonic() + 120
                while seen < 300 * 1024:
                    seen += len(next(lines))
                    assert time.monotonic() < deadline, f"only {seen} bytes of snapshots"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert all(not line.startswith('data: {"error"') for line in lines)  # it ends by itself
            assert proc.wait(timeout=60) == 0
    print(f"serve exited {time.monotonic() - t0:.1f} s after SIGTERM with a stuck watcher")
