"""Fault soak: the whole stack on simulated phones, a mixed workload, random faults, and the invariants
that must hold throughout and afterwards (issue 13, docs/reliability.md).

    nice .venv/bin/python benchmarks/soak.py --requests 10000 --time-limit 1800 [--phones 8] [--speed 4]

Processes, as deployed: this script holds the phones (a ``SimLab``: 8 simulated phones behind their own
real adb server, which the lab's watchdog restarts when it dies) and the load; the server runs on its
own (``benchmarks/probed_server.py``: the production app plus a ``/_probe`` route for its asyncio tasks
and event-loop lag), so its RSS and tasks are its own. Loopback only; bounded in count and time.

Workload (random, seeded): chat or completions, streaming or not, n in 1..3, tools on a share of
chats, and clients that leave early (a stream closed after a few chunks, a plain request abandoned
after a moment). Faults (one at a time per phone, a few at once): the runtime crashes after N tokens,
hangs, writes garbage lines; the phone's TCP link is dropped; its connections are refused for a while;
it is unplugged and plugged in again; the adb server is killed (and comes back by the watchdog).

Every request must end, before its deadline, in a completion or a clean OpenAI error: a status with
the ``{"error": {message, type, param, code}}`` envelope and a code the server documents (429
queue_full, 503 no_phone_available / queue_timeout, 502 phone_*), or in a stream, a final error event
with such a code. Anything else (a 500, a hang past the deadline, a stream cut without [DONE] or an
error event, an unknown code) is *unexplained*. Afterwards, with the faults healed and every phone
ready and idle: no phone process beyond each phone's one session process, as many server tasks as
after the warm-up, and RSS flat (every sample in the last 20 % of the run within 10 % of the RSS after
the warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.sim.harness import SimLab, SimPhone, free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "qwen3.5-0.8b"
# codes the server documents for a request that could not be served (server/errors.py)
EXPLAINED = {
    429: {"queue_full"},
    502: {"phone_lost", "phone_stalled", "protocol_violation", "phone_busy", "phone_error"},
    503: {"no_phone_available", "queue_timeout"},
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
FAULTS = ("crash", "hang", "garbage", "drop", "refuse", "unplug", "adb_kill")


@dataclass
class Config:
    requests: int = 500
    time_limit_s: float = 90.0
    phones: int = 8
    speed: float = 0.0  # simulated phone speed (0: no simulated delays)
    clients: int = 16
    seed: int = 13
    warmup: int = 40
    fault_every_s: float = 1.5  # a new fault this often (on average)
    max_faults: int = 3  # faults active at once
    adb_kill_every_s: float = 25.0  # the adb server is killed this often
    settle_timeout_s: float = 120.0
    deadline_slack_s: float = 30.0  # a request's deadline beyond its queue and stall timeouts (deadline_s)
    server_env: dict[str, str] = field(default_factory=dict)  # extra QHX_* for the server
    log: Path | None = None  # server log file (default: in the work dir)
    verbose: bool = False


@dataclass
class Outcome:
    kind: str  # completed | left | error | unexplained | hung
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    requests: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    unexplained: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    adb_restarts: int = 0
    duration_s: float = 0.0
    rss_warm_kib: int = 0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    rss_last20_kib: tuple[int, int] = (0, 0)
    tasks_warm: int = 0
    tasks_end: int = 0
    task_diff: dict[str, int] = field(default_factory=dict)
    phone_procs: dict[str, int] = field(default_factory=dict)
    leaked_procs: int = 0
    settled: bool = False
    tracebacks: int = 0
    lag: dict[str, float] = field(default_factory=dict)
    load_avg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    teardown_error: str | None = None

    @property
    def rss_flat(self) -> bool:
        lo, hi = self.rss_last20_kib
        return self.rss_warm_kib > 0 and lo >= 0.9 * self.rss_warm_kib and hi <= 1.1 * self.rss_warm_kib

    @property
    def ok(self) -> bool:
        return (not self.unexplained and not self.hung and self.leaked_procs == 0 and self.settled
                and self.tasks_end == self.tasks_warm and self.rss_flat and self.tracebacks == 0
                and self.teardown_error is None)

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        errors = ", ".join(f"{k} {v}" for k, v in self.errors.most_common())
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        lo, hi = self.rss_last20_kib
        out = [
            f"requests: {self.requests} in {self.duration_s:.0f} s ({kinds})",
            f"clean errors: {errors or 'none'}",
            f"faults injected: {faults or 'none'}; adb server restarts: {self.adb_restarts}",
            (f"hung: {len(self.hung)}; unexplained: {len(self.unexplained)}; tracebacks in the server log: "
             f"{self.tracebacks}"),
            (f"phones settled (all ready, idle) after the run: {self.settled}; phone processes: "
             f"{sum(self.phone_procs.values())} for {len(self.phone_procs)} phones, leaked: {self.leaked_procs}"),
            f"server asyncio tasks: {self.tasks_warm} after warm-up, {self.tasks_end} at the end"
            + (f" (diff {self.task_diff})" if self.task_diff else ""),
            (f"server RSS: {self.rss_warm_kib / 1024:.1f} MiB after warm-up; last 20 %: "
             f"{lo / 1024:.1f}-{hi / 1024:.1f} MiB; flat (within 10 %): {self.rss_flat}"),
            f"event-loop lag: {self.lag}",
            f"load average at the end: {' '.join(f'{x:.2f}' for x in self.load_avg)}",
        ]
        if self.teardown_error:
            out.append(f"the simulated phones did not stop cleanly: {self.teardown_error}")
        out += [f"  unexplained: {u}" for u in self.unexplained[:20]]
        out += [f"  hung: {h}" for h in self.hung[:20]]
        return out


# --------------------------------------------------------------------------- the server process


class Server:
    """``benchmarks/probed_server.py`` on a free port, pointed at one adb server (``host:port``)."""

    def __init__(self, adb_server: str, workdir: Path, env: dict[str, str], log: Path | None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log or workdir / "server.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("QHX_")}
        environ.update({
            "QHX_ADB_SERVERS": json.dumps([adb_server]), "QHX_SIM": "0", "QHX_PORT": str(self.port),
            "QHX_LOG_LEVEL": "warning", "QHX_TOKENIZER_CACHE": str(workdir / "tokenizers"), **env,
        })
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "probed_server.py")],
                                     env=environ, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def probe(self, reset: bool = False) -> dict[str, Any]:
        r = httpx.get(self.base + "/_probe" + ("?reset=1" if reset else ""), timeout=10)
        return dict(r.json())

    def devices(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.base + "/v1/devices", timeout=10).json()["data"])

    def wait_settled(self, phones: int, timeout: float) -> bool:
        """Every phone ready, idle, session mode; False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                ds = self.devices()
                if len(ds) == phones and all(d["state"] == "ready" and d["request_in_flight"] is None for d in ds):
                    return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# --------------------------------------------------------------------------- phone-side processes


def phone_processes(lab: SimLab) -> dict[str, int]:
    """Simulated runtime processes alive per phone serial (found by their working directory, which is
    inside the phone's sandbox)."""
    sandboxes = {str(p.sandbox): p.serial for p in lab.phones}
    counts = dict.fromkeys(sandboxes.values(), 0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"server.sim.runtime" not in cmdline:
                continue
            stat = Path(f"/proc/{entry}/stat").read_text()
            if stat[stat.rindex(")") + 2] == "Z":
                continue
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        for root, serial in sandboxes.items():
            if cwd == root or cwd.startswith(root + "/"):
                counts[serial] += 1
    return counts


# --------------------------------------------------------------------------- faults


class Faults:
    """Random faults on the lab's phones and its adb server, each healed after a while."""

    def __init__(self, lab: SimLab, cfg: Config, rng: random.Random, report: Report) -> None:
        self.lab, self.cfg, self.rng, self.report = lab, cfg, rng, report
        self.active: dict[str, tuple[str, float]] = {}  # serial (or "adb") -> (fault, heal at)
        self.last_adb_kill = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-faults", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        for key in list(self.active):
            self._heal(key)

    def _run(self) -> None:
        while not self._stop.wait(self.rng.expovariate(1 / self.cfg.fault_every_s)):
            now = time.monotonic()
            for key, (_, until) in list(self.active.items()):
                if now >= until:
                    self._heal(key)
            if len(self.active) < self.cfg.max_faults:
                try:
                    self._inject()
                except (OSError, RuntimeError, KeyError, subprocess.SubprocessError, TimeoutError) as e:
                    # a fault that could not be set is not a server failure
                    print(f"soak: fault not injected: {e!r}", file=sys.stderr)

    def _inject(self) -> None:
        # an adb server kill is due once adb_kill_every_s passed since the last (or the start): then it is
        # the next fault, so that a short run has one for sure; between kills it is never drawn
        due = time.monotonic() - self.last_adb_kill >= self.cfg.adb_kill_every_s and "adb" not in self.active
        fault = "adb_kill" if due else self.rng.choice([f for f in FAULTS if f != "adb_kill"])
        if fault == "adb_kill":
            self.last_adb_kill = time.monotonic()
            self.lab.kill_adb_server()  # the lab's watchdog starts it again and reconnects the phones
            self.active["adb"] = (fault, time.monotonic() + 2.0)
            self.report.faults[fault] += 1
            return
        free = [p for p in self.lab.phones if p.serial not in self.active]
        if not free:
            return
        phone = self.rng.choice(free)
        heal_in = self.rng.uniform(1.0, 5.0)
        if fault == "crash":
            phone.configure(crash_after=self.rng.randint(0, 12))
        elif fault == "hang":
            phone.configure(hang=True)
        elif fault == "garbage":
            phone.configure(garbage=True)
        elif fault == "drop":
            phone.drop_connections()
            heal_in = 0.0
        elif fault == "refuse":
            phone.refuse_connections(True)
            phone.drop_connections()
        elif fault == "unplug":
            self.lab.unplug(phone.serial)
        self.active[phone.serial] = (fault, time.monotonic() + heal_in)
        self.report.faults[fault] += 1

    def _heal(self, key: str) -> None:
        fault, _ = self.active.pop(key)
        if key == "adb":
            return
        phone: SimPhone = self.lab.phone(key)
        if fault in ("crash", "hang", "garbage"):
            phone.configure(crash_after=None, hang=False, garbage=False)
        elif fault == "refuse":
            phone.refuse_connections(False)
            self._connect(phone)
        elif fault == "unplug":
            phone.plug()
            self._connect(phone)
        elif fault == "drop":
            self._connect(phone)

    def _connect(self, phone: SimPhone) -> None:
        # the adb server reconnects a dropped TCP phone by itself, slowly; plugging in is faster
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.lab.adb("connect", phone.serial, timeout=10)


# --------------------------------------------------------------------------- the workload


def make_request(rng: random.Random, i: int) -> tuple[str, dict[str, Any], int | None, float | None]:
    """(path, body, leave after N chunks (streams), leave after S seconds (plain requests))."""
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    n = rng.choice((1, 1, 1, 2, 3))
    max_tokens = rng.randint(1, 48)
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "n": n, "stream": stream,
                            "seed": rng.randint(0, 1 << 30)}
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": f"Request {i}: tell me about {rng.random():.4f}"}]
        if rng.random() < 0.3:
            body["tools"] = [WEATHER]
    else:
        path = "/v1/completions"
        body["prompt"] = f"Request {i} begins with {rng.random():.4f}"
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    leave_chunks = rng.randint(1, 6) if stream and rng.random() < 0.15 else None
    leave_s = rng.uniform(0.01, 0.5) if not stream and rng.random() < 0.1 else None
    return path, body, leave_chunks, leave_s


def classify_error(status: int, text: str) -> Outcome:
    try:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"}, "envelope fields"
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        return Outcome("unexplained", f"{status} without the OpenAI envelope ({e}): {text[:200]}")
    if err["code"] in EXPLAINED.get(status, set()):
        return Outcome("error", f"{status} {err['code']}")
    return Outcome("unexplained", f"{status} {err['code']}: {err['message'][:200]}")


async def one_request(client: httpx.AsyncClient, path: str, body: dict[str, Any], leave_chunks: int | None,
                      leave_s: float | None) -> Outcome:
    if not body["stream"]:
        post = client.post(path, json=body)
        if leave_s is not None:
            try:
                r = await asyncio.wait_for(post, leave_s)
            except TimeoutError:
                return Outcome("left", "plain request abandoned")
        else:
            r = await post
        if r.status_code != 200:
            return classify_error(r.status_code, r.text)
        data = r.json()
        if len(data.get("choices", [])) != body["n"]:
            return Outcome("unexplained", f"200 with {len(data.get('choices', []))} choices, n={body['n']}")
        return Outcome("completed")
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return classify_error(r.status_code, (await r.aread()).decode("utf-8", "replace"))
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                return Outcome("completed")
            event = json.loads(payload)
            if "error" in event:
                err = event["error"]
                if isinstance(err, dict) and err.get("code") in EXPLAINED[502] | EXPLAINED[503]:
                    return Outcome("error", f"stream error event {err['code']}")
                return Outcome("unexplained", f"stream error event {str(err)[:200]}")
            chunks += 1
            if leave_chunks is not None and chunks >= leave_chunks:
                return Outcome("left", "stream closed early")
        return Outcome("unexplained", "stream ended without [DONE] or an error event")


def deadline_s(cfg: Config, env: dict[str, str], body: dict[str, Any]) -> float:
    """How long a request may take before it counts as hung: two queue waits and stall timeouts (a
    retry), its tokens at the phones' pace, and slack for a loaded machine."""
    queue = float(env.get("QHX_QUEUE_TIMEOUT_S", 300))
    stall = float(env.get("QHX_STALL_TIMEOUT_S", 30))
    per_token = 0.0 if cfg.speed <= 0 else 1 / 22.7 / cfg.speed
    return 2 * (queue + stall) + 3 * body["max_tokens"] * per_token + cfg.deadline_slack_s


def load_elsewhere(cfg: Config, base: str, report: Report, count: int, seed: int, *, stop_at: float) -> None:
    """:func:`load` in a process of its own (the phones' event loop in this one must not compete with
    it for the GIL: with both in one process, under a loaded machine, the phones' loop stalled for
    seconds), its outcomes merged into ``report``."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        child: Report = pool.apply(_load_child, (cfg, base, count, seed, stop_at))
    report.requests += child.requests
    report.kinds.update(child.kinds)
    report.errors.update(child.errors)
    report.unexplained += child.unexplained
    report.hung += child.hung


def _load_child(cfg: Config, base: str, count: int, seed: int, stop_at: float) -> Report:
    report = Report()
    asyncio.run(load(cfg, base, report, count, seed, stop_at=stop_at))
    return report


async def load(cfg: Config, base: str, report: Report, count: int, seed: int, *, stop_at: float) -> None:
    rng = random.Random(seed)
    next_index = 0
    limits = httpx.Limits(max_connections=cfg.clients + 8, max_keepalive_connections=cfg.clients)
    env = cfg.server_env
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(600, connect=10)) as client:

        async def worker() -> None:
            nonlocal next_index
            while next_index < count and time.monotonic() < stop_at:
                i = next_index
                next_index += 1
                path, body, leave_chunks, leave_s = make_request(rng, i)
                t0 = time.monotonic()
                limit = deadline_s(cfg, env, body)
                try:
                    async with asyncio.timeout(limit):
                        outcome = await one_request(client, path, body, leave_chunks, leave_s)
                except TimeoutError:
                    outcome = Outcome("hung", f"no end within {limit:.0f} s")
                except (httpx.HTTPError, ValueError) as e:
                    outcome = Outcome("unexplained", f"{type(e).__name__}: {e}")
                outcome.seconds = time.monotonic() - t0
                report.requests += 1
                report.kinds[outcome.kind] += 1
                what = f"#{i} {path} n={body['n']} stream={body['stream']} max_tokens={body['max_tokens']}"
                if outcome.kind == "error":
                    report.errors[outcome.detail] += 1
                elif outcome.kind == "unexplained":
                    report.unexplained.append(f"{what}: {outcome.detail}")
                elif outcome.kind == "hung":
                    report.hung.append(f"{what}: {outcome.detail}")
                if cfg.verbose and outcome.kind in ("unexplained", "hung"):
                    print(f"soak: {outcome.kind} {what}: {outcome.detail}", file=sys.stderr)
                if outcome.kind == "error" and ("queue_full" in outcome.detail or "no_phone" in outcome.detail):
                    await asyncio.sleep(rng.uniform(0.2, 1.0))  # as a client honouring Retry-After, shortened

        await asyncio.gather(*(worker() for _ in range(cfg.clients)))


# --------------------------------------------------------------------------- the run


DEFAULT_SERVER_ENV = {
    "QHX_STALL_TIMEOUT_S": "3", "QHX_CANCEL_TIMEOUT_S": "2", "QHX_QUEUE_TIMEOUT_S": "20",
    "QHX_MAX_QUEUE": "32", "QHX_QUARANTINE_S": "1", "QHX_QUARANTINE_MAX_S": "4", "QHX_DEVICE_POLL_S": "0.5",
    "QHX_RESTART_BACKOFF_MAX_S": "2", "QHX_SSE_PING_S": "2", "QHX_READY_TIMEOUT_S": "30",
    "QHX_ADB_TIMEOUT_S": "5",
}


def run(cfg: Config) -> Report:
    report = Report()
    try:
        _run(cfg, report)
    except TimeoutError as e:  # the lab's teardown: its phones did not stop in time
        report.teardown_error = f"{type(e).__name__}: {e}"
    return report


def _run(cfg: Config, report: Report) -> None:
    cfg.server_env = {**DEFAULT_SERVER_ENV, **cfg.server_env}
    sim_config = {"speed": cfg.speed, "load_s": 0.5, "stop_rate": 0.05}
    with tempfile.TemporaryDirectory(prefix="qhx-soak-") as tmp, \
            SimLab(cfg.phones, speed=cfg.speed, sim_config=sim_config, workdir=Path(tmp) / "lab") as lab:
        server = Server(lab.adb_server, Path(tmp), cfg.server_env, cfg.log)
        try:
            if not server.wait_settled(cfg.phones, cfg.settle_timeout_s):
                raise RuntimeError(f"server not ready, see {server.log_path}")
            t_start = time.monotonic()
            stop_at = t_start + cfg.time_limit_s
            # warm-up without faults: tokenizers, templates, every phone's first requests
            load_elsewhere(cfg, server.base, report, cfg.warmup, cfg.seed, stop_at=stop_at)
            server.wait_settled(cfg.phones, cfg.settle_timeout_s)
            time.sleep(1.0)  # connections of the warm-up closed on the server side too
            warm = server.probe(reset=True)
            report.tasks_warm = warm["tasks"]
            report.rss_warm_kib = server.rss_kib()

            sampling = threading.Event()

            def sample_rss() -> None:
                while not sampling.wait(0.5):
                    with contextlib.suppress(OSError, ValueError):
                        report.rss_samples.append((time.monotonic(), server.rss_kib()))

            sampler = threading.Thread(target=sample_rss, daemon=True)
            sampler.start()
            faults = Faults(lab, cfg, random.Random(cfg.seed + 1), report)
            faults.start()
            try:
                load_elsewhere(cfg, server.base, report, cfg.requests - report.requests, cfg.seed + 2,
                               stop_at=stop_at)
            finally:
                faults.stop()
                sampling.set()
                sampler.join()
            report.duration_s = time.monotonic() - t_start
            report.lag = server.probe()["lag"]
            report.adb_restarts = lab.adb_restarts
            # afterwards: every phone back, idle; then count what is left
            report.settled = server.wait_settled(cfg.phones, cfg.settle_timeout_s)
            # a leak stays; a task that is only finishing (a connection closing, a phone's last poll on a
            # loaded machine) is gone within a few seconds: count what is still there after up to 10 s
            deadline = time.monotonic() + 10.0
            while True:
                time.sleep(1.0)
                end = server.probe()
                if end["tasks"] <= report.tasks_warm or time.monotonic() > deadline:
                    break
            report.tasks_end = end["tasks"]
            names = collections.Counter(end["task_names"])
            names.subtract(warm["task_names"])
            report.task_diff = {k: v for k, v in names.items() if v}
            report.phone_procs = phone_processes(lab)
            states = {d["serial"]: d for d in server.devices()}
            report.leaked_procs = sum(
                max(0, n - (1 if states.get(s, {}).get("mode") == "session" else 0))
                for s, n in report.phone_procs.items()
            )
            samples = report.rss_samples
            tail = [kib for _, kib in samples[int(len(samples) * 0.8):]] or [server.rss_kib()]
            report.rss_last20_kib = (min(tail), max(tail))
        finally:
            server.stop()
            log = server.log_path.read_text(errors="replace")
            report.tracebacks = log.count("Traceback (most recent call last)")
            report.load_avg = os.getloadavg()
            if cfg.log is None and (report.tracebacks or report.unexplained):
                keep = Path(tempfile.gettempdir()) / f"qhx-soak-server-{os.getpid()}.log"
                keep.write_text(log)
                print(f"soak: server log kept in {keep}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--time-limit", type=float, default=1800.0, help="seconds; the run stops there")
    parser.add_argument("--phones", type=int, default=8)
    parser.add_argument("--speed", type=float, default=4.0, help="simulated phone speed (0: no delays)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--fault-every", type=float, default=2.0, help="mean seconds between faults")
    parser.add_argument("--adb-kill-every", type=float, default=60.0)
    parser.add_argument("--log", type=Path, help="keep the server log here")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    cfg = Config(requests=args.requests, time_limit_s=args.time_limit, phones=args.phones, speed=args.speed,
                 clients=args.clients, seed=args.seed, fault_every_s=args.fault_every,
                 adb_kill_every_s=args.adb_kill_every, log=args.log, verbose=args.verbose)
    report = run(cfg)
    for line in report.lines():
        print(line)
    print("PASS" if report.ok else "FAIL")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
