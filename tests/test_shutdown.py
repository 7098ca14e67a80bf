"""`qhx-server serve` ending: SIGTERM drains, a second signal cancels at once, SIGKILL leaves nothing
behind (server/serve.py, server/api/shutdown.py, server/sim/lifetime.py; docs/reliability.md).

Real processes and real signals. The drain tests run the phones in a `qhx-server sim` of their own,
as phones are on a bench: after the server is gone, no runtime may be left running on them. The
kill test runs `serve --sim`, whose simulated phones and private adb server are its own children.
Durations are printed, not asserted; bounds are only there so that a hang fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.sim.cli import read_banner
from server.sim.simconfig import write_sim_config

ROOT = Path(__file__).resolve().parent.parent
GRACE_S = 4.0
# long enough to outlast the grace period, short enough for one that finishes within it
TOKENS_PER_S = 40.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def descendants(pid: int) -> list[int]:
    kids, found, todo = _children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def still_alive(pids: list[int], within_s: float = 10.0) -> list[str]:
    """The command lines of ``pids`` still running after ``within_s``."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [cmdline(p) for p in pids if alive(p)]


def reap(pids: list[int]) -> None:
    """Kill what a failed test left running (only these processes, which the test started)."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def runtimes(pid: int) -> list[int]:
    return [p for p in descendants(pid) if "server.sim.runtime" in cmdline(p)]


@contextlib.contextmanager
def serving(args: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``start_server``, and the server and what it started killed at the end if still running."""
    proc, base = start_server(args)
    started: list[int] = []
    try:
        yield proc, base
    finally:
        if proc.poll() is None:
            started = descendants(proc.pid)
            proc.kill()
            proc.wait(10)
        reap(started)


def start_server(args: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--log-level",
                             "warning", *args], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            r = httpx.get(base + "/ready", timeout=2)
            if r.status_code == 200 and all(p["state"] == "ready" for p in r.json()["phones"]):
                httpx.post(base + "/v1/completions", timeout=60,
                           json={"model": "qwen3.5-0.8b", "prompt": "hi", "max_tokens": 1}).raise_for_status()
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("qhx-server serve did not become ready")


class Body(threading.Thread):
    """One completion not streamed: its status and JSON."""

    def __init__(self, base: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.max_tokens = base, max_tokens
        self.status, self.json = 0, {}

    def run(self) -> None:
        r = httpx.post(self.base + "/v1/completions", timeout=120, json={
            "model": "qwen3.5-0.8b", "prompt": "Go on", "max_tokens": self.max_tokens, "ignore_eos": True})
        self.status, self.json = r.status_code, r.json()


class Stream(threading.Thread):
    """One streamed completion read to its end: its data lines, the first one awaited with ``started``."""

    def __init__(self, base: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.base, self.max_tokens = base, max_tokens
        self.started = threading.Event()
        self.lines: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {"model": "qwen3.5-0.8b", "prompt": "Go on", "max_tokens": self.max_tokens, "stream": True,
                "ignore_eos": True}
        try:
            with httpx.stream("POST", self.base + "/v1/completions", json=body, timeout=120) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line)
                        self.started.set()
        except BaseException as exc:  # noqa: BLE001 - asserted on by the test
            self.error = exc
        finally:
            self.started.set()

    @property
    def ending(self) -> str:
        """"done", or the error code of the last event."""
        last = self.lines[-1] if self.lines else ""
        if last == "data: [DONE]":
            return "done"
        return str(json.loads(last[len("data: "):]).get("error", {}).get("code")) if last else repr(self.error)


@pytest.fixture(scope="module")
def phones() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`qhx-server sim --phones 2` (a process of its own, as phones are), at TOKENS_PER_S."""
    sim = subprocess.Popen([sys.executable, "-m", "server.cli", "sim", "--phones", "2", "--speed", "1",
                            "--log-level", "warning"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert sim.stdout is not None
    adb_server, sandboxes = read_banner(sim.stdout)
    assert adb_server is not None and len(sandboxes) == 2
    for sandbox in sandboxes:
        write_sim_config(sandbox, {"decode_tps": TOKENS_PER_S, "load_s": 0.1, "stop_rate": 0.0})
    yield sim, adb_server
    sim.send_signal(signal.SIGINT)
    try:
        sim.wait(20)
    except subprocess.TimeoutExpired:
        sim.kill()
        sim.wait(10)
    sim.stdout.close()


def test_sigterm_lets_streams_finish_within_the_grace_period_then_ends_the_rest_cleanly(
    phones: tuple[subprocess.Popen[str], str],
) -> None:
    """8 streams on 2 phones (2 running, 6 queued), one short enough to finish within the grace
    period: that one ends with [DONE], the others with the shutdown's error event (and a request not
    streamed gets the 503); the server exits 0, and no runtime is left running on the phones."""
    sim, adb_server = phones
    with serving(["--sim", "0", "--adb-server", adb_server, "--shutdown-grace-s", str(GRACE_S)]) as (proc, base):
        drain_eight_streams(proc, base)
    assert still_alive(runtimes(sim.pid)) == []  # every phone idle: its session ended with the server


def drain_eight_streams(proc: subprocess.Popen[bytes], base: str) -> None:
    short = Stream(base, max_tokens=int(TOKENS_PER_S * GRACE_S / 2))
    short.start()
    assert short.started.wait(30)
    longs = [Stream(base, max_tokens=1000) for _ in range(7)]
    for s in longs:
        s.start()
    # the other phone took one of them (which one is a race); a queued stream has its 200, no data yet
    deadline = time.monotonic() + 30
    while not any(s.lines for s in longs):
        assert time.monotonic() < deadline, "no stream reached the second phone"
        time.sleep(0.05)
    body = Body(base, max_tokens=1000)  # and one not streamed, queued too
    body.start()
    time.sleep(0.5)  # the other six are queued: admitted, so their 200 is out
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(httpx.ConnectError):  # no new connection is taken (bounded by the loop)
        for _ in range(100):
            httpx.get(base + "/health", timeout=2)
            time.sleep(0.05)
    assert proc.wait(GRACE_S + 30) == 0
    exited_s = time.monotonic() - t0
    for t in [short, *longs, body]:
        t.join(10)
    print(f"SIGTERM, grace {GRACE_S} s, 8 streams: exit 0 after {exited_s:.2f} s")
    assert short.ending == "done"
    assert [s.ending for s in longs] == ["server_shutting_down"] * 7
    assert body.status == 503 and body.json["error"]["code"] == "server_shutting_down"


def test_a_second_signal_cancels_what_runs_at_once(phones: tuple[subprocess.Popen[str], str]) -> None:
    sim, adb_server = phones
    with serving(["--sim", "0", "--adb-server", adb_server, "--shutdown-grace-s", "600"]) as (proc, base):
        streams = [Stream(base, max_tokens=1000) for _ in range(2)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.started.wait(30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0  # far less than the 600 s grace period
        print(f"SIGTERM then SIGINT: exit 0 after {time.monotonic() - t0:.2f} s")
        for s in streams:
            s.join(10)
    assert [s.ending for s in streams] == ["server_shutting_down"] * 2
    assert still_alive(runtimes(sim.pid)) == []


def test_sigkill_leaves_nothing_the_server_started_running() -> None:
    """`serve --sim`: the private adb server (in a session of its own) outlived a SIGKILLed server."""
    with serving(["--sim", "1"]) as (proc, base):
        stream = Stream(base, max_tokens=1000)
        stream.start()
        assert stream.started.wait(30)
        started = descendants(proc.pid)
        assert any("nodaemon" in cmdline(p) for p in started), [cmdline(p) for p in started]  # the adb server
        assert any("server.sim.runtime" in cmdline(p) for p in started)  # a phone's runtime, generating
        proc.kill()
        proc.wait(10)
    left = still_alive(started)
    reap(started)
    assert left == []


def test_clients_that_stall_do_not_hold_the_shutdown(tmp_path: Path) -> None:
    """A stream whose client stopped reading (its send waits) and a request whose body never comes:
    neither can end on its own, and uvicorn's backstop (grace + cancel timeout + 5 s) cut them with a
    traceback, every request waiting for it. Now the stream's connection is dropped (it cannot take
    its last event) and the body gets the 503, so the shutdown ends cleanly."""
    log = tmp_path / "serve.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--sim", "1",
                                 "--sim-speed", "8", "--shutdown-grace-s", "1", "--write-timeout-s", "600",
                                 "--log-level", "warning"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    started: list[int] = []
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while not _ready(base):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        unread = _raw(port, json.dumps({"model": "qwen3.5-0.8b", "prompt": "Go", "max_tokens": 1000, "stream": True,
                                        "ignore_eos": True}).encode(), rcvbuf=4096)
        no_body = _raw(port, None)
        # the phone is done (one token an event: ~190 KB of stream, far more than the buffers hold); the
        # stream waits for its client
        deadline = time.monotonic() + 120
        while httpx.get(base + "/v1/devices", timeout=5).json()["data"][0]["tokens_served"] < 1000:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        started = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
        no_body.settimeout(10)
        answer = no_body.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"server_shutting_down" in answer, answer[:300]
        for sock in (unread, no_body):
            sock.close()
    finally:
        if proc.poll() is None:
            started = started or descendants(proc.pid)
            proc.kill()
            proc.wait(10)
        reap(started)
    text = log.read_text()
    assert "timeout graceful shutdown exceeded" not in text and "Traceback" not in text, text[-3000:]
    assert "connection dropped" in text


def _ready(base: str) -> bool:
    try:
        r = httpx.get(base + "/ready", timeout=2)
        return r.status_code == 200 and all(p["state"] == "ready" for p in r.json()["phones"])
    except httpx.HTTPError:
        return False


def _raw(port: int, body: bytes | None, rcvbuf: int | None = None) -> socket.socket:
    """A request on a raw socket: ``body`` sent whole, or (None) a length declared and nothing sent."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if body is not None else 100}\r\n\r\n").encode()
    sock.sendall(head + (body or b""))
    return sock
