"""1,000 concurrent streams on 4 simulated phones: FIFO or a clean 429, /health, event-loop lag, RSS.

    nice .venv/bin/python benchmarks/streams1000.py [--streams 1000] [--extra 50] [--phones 4] [--speed 4]

Processes: the phones (``qhx-server sim --phones 4``: their own adb server), the server
(``benchmarks/probed_server.py``: the production app plus ``/_probe`` for its event-loop lag, with
``QHX_MAX_QUEUE`` raised to the number of streams), a /health prober (its own process, so that the
load's event loop does not delay its clock) and this script, which opens the streams.

The phones are held first (the ``hang`` knob: a runtime sends no token until it is cleared), then the
streams are opened ``--spacing-ms`` apart; once every one is admitted (its 200 comes when it is queued
or running) all 1,000 are open at once, 4 on the phones and the rest queued (``QHX_MAX_QUEUE`` is
streams - phones), and ``--extra`` more requests are sent: the queue is full, they must get a clean
429. Then the phones are let go. Phones never stop early: every request runs ``--max-tokens`` tokens.

Measured and checked:

* every stream ends with [DONE] (or the request got a 429 with the OpenAI envelope), none refused
  while a later one was admitted;
* FIFO: the phones started the requests in the order they reached the server: for each request, its
  start (``host_start_t_ms + queue_ms``, from ``return_timings``) is not earlier than the start of any
  request that arrived (``host_start_t_ms``) before it, give or take ``--fifo-slack-ms`` (phones
  answering a few ms apart);
* /health latency, every 50 ms throughout (p50, p99, max; target p99 < 50 ms);
* the server's event-loop lag (how late a 5 ms sleep wakes up: p50, p99, max; target p99 < 20 ms);
* server RSS, sampled every 0.5 s (peak; target < 400 MB).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soak import Server

from server.sim.cli import read_banner
from server.sim.simconfig import write_sim_config

MODEL = "qwen3.5-0.8b"
PROMPT = "Once upon a time"

HEALTH_PROBER = r"""
import json, sys, time, httpx
url, out, stop = sys.argv[1], sys.argv[2], sys.argv[3]
import os
samples = []
with httpx.Client(timeout=5) as client:
    while not os.path.exists(stop):
        t0 = time.perf_counter()
        try:
            ok = client.get(url).status_code == 200
        except httpx.HTTPError:
            ok = False
        samples.append((time.monotonic(), (time.perf_counter() - t0) * 1000, ok))
        time.sleep(max(0.0, 0.05 - (time.perf_counter() - t0)))
json.dump(samples, open(out, "w"))
"""


@dataclass
class Stream:
    index: int
    status: int | None = None
    error: str | None = None
    done: bool = False
    chunks: int = 0
    start_ms: float | None = None  # server: host_start_t_ms + queue_ms (the phone accepted the prompt)
    arrival_ms: float | None = None  # server: host_start_t_ms


@dataclass
class Result:
    streams: list[Stream] = field(default_factory=list)
    health_ms: list[float] = field(default_factory=list)
    health_failures: int = 0
    idle_health_ms: list[float] = field(default_factory=list)
    idle_lag: dict[str, float] = field(default_factory=dict)
    lag: dict[str, float] = field(default_factory=dict)
    gc: dict[str, Any] = field(default_factory=dict)
    rss_kib: list[int] = field(default_factory=list)
    seconds: float = 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run_stream(client: httpx.AsyncClient, s: Stream, max_tokens: int, admitted: asyncio.Event) -> None:
    # a prompt of its own (as from different users): with one shared prompt, prefix-aware routing
    # may rightly let a request wait for the busy phone holding it while later ones take free phones
    body = {"model": MODEL, "prompt": f"{s.index} {PROMPT}", "max_tokens": max_tokens, "stream": True,
            "return_timings": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            s.status = r.status_code
            admitted.set()
            if r.status_code != 200:
                err = json.loads(await r.aread())["error"]
                if set(err) != {"message", "type", "param", "code"}:
                    s.error = f"{r.status_code} without the envelope"
                elif r.status_code != 429 or err["code"] != "queue_full":
                    s.error = f"{r.status_code} {err['code']}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    s.done = True
                    return
                event = json.loads(line[6:])
                if "error" in event:
                    s.error = f"stream error event {event['error'].get('code')}"
                    return
                s.chunks += 1
                timings = event.get("timings")
                if timings and timings.get("queue_ms") is not None:
                    s.arrival_ms = timings["host_start_t_ms"]
                    s.start_ms = timings["host_start_t_ms"] + timings["queue_ms"]
            s.error = "stream ended without [DONE]"
    except (httpx.HTTPError, ValueError, KeyError) as e:
        s.error = f"{type(e).__name__}: {e}"
    finally:
        admitted.set()


async def load(base: str, n: int, extra: int, max_tokens: int, spacing_s: float,
               release: Callable[[], None], inspect: Callable[[], None] | None = None) -> list[Stream]:
    """Open ``n`` streams ``spacing_s`` apart while the phones are held (every phone's first token waits),
    then ``extra`` more (the queue is full: 429), then let the phones go and wait for every stream."""
    limits = httpx.Limits(max_connections=n + extra + 16, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(3600, connect=60)) as client:
        streams = [Stream(i) for i in range(n + extra)]
        tasks, admitted = [], []
        for s in streams:
            if s.index == n:  # the extras go once all the others are in (queued or running)
                await asyncio.gather(*(a.wait() for a in admitted))
            event = asyncio.Event()
            admitted.append(event)
            tasks.append(asyncio.create_task(run_stream(client, s, max_tokens, event)))
            await asyncio.sleep(spacing_s)
        await asyncio.gather(*(a.wait() for a in admitted))
        if inspect is not None:
            inspect()
        await asyncio.to_thread(release)
        await asyncio.gather(*tasks)
    return streams


def start_phones(workdir: Path, phones: int, speed: float) -> tuple[subprocess.Popen[str], str, list[Path]]:
    sim = subprocess.Popen([sys.executable, "-m", "server.cli", "sim", "--phones", str(phones), "--speed",
                            str(speed), "--workdir", str(workdir), "--log-level", "warning"],
                           stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    assert sim.stdout is not None
    adb_server, sandboxes = read_banner(sim.stdout)
    if adb_server is None:
        raise RuntimeError("qhx-server sim did not start")
    return sim, adb_server, sandboxes


def run(streams: int, extra: int, phones: int, speed: float, max_tokens: int, spacing_s: float,
        idle_s: float, state_reuse: str = "on") -> Result:
    result = Result()
    with tempfile.TemporaryDirectory(prefix="qhx-streams-") as tmp:
        work = Path(tmp)
        sim, adb_server, sandboxes = start_phones(work / "lab", phones, speed)
        for sandbox in sandboxes:
            write_sim_config(sandbox, {"stop_rate": 0.0})
        # the queue holds exactly the streams the phones are not running: the extras get 429
        env = {"QHX_MAX_QUEUE": str(streams - phones), "QHX_QUEUE_TIMEOUT_S": "3600",
               "QHX_STALL_TIMEOUT_S": "300", "QHX_STATE_REUSE": state_reuse}
        server = Server(adb_server, work, env, None)
        stop_file, health_out = work / "stop", work / "health.json"
        prober: subprocess.Popen[bytes] | None = None
        t_idle = t0 = time.monotonic()
        sampling = threading.Event()
        try:
            if not server.wait_settled(phones, 180):
                raise RuntimeError(f"server not ready, see {server.log_path}")
            httpx.post(server.base + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                       timeout=120).raise_for_status()
            prober = subprocess.Popen([sys.executable, "-c", HEALTH_PROBER, server.base + "/health",
                                       str(health_out), str(stop_file)])

            def sample() -> None:
                while not sampling.wait(0.5):
                    result.rss_kib.append(server.rss_kib())

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            def hold(on: bool) -> None:  # a held phone's runtime sends no token until let go
                for sandbox in sandboxes:
                    write_sim_config(sandbox, {"hang": on})

            hold(True)
            # the same measures on the idle server first: what this machine gives without the load
            server.probe(reset=True)
            t_idle = time.monotonic()
            time.sleep(idle_s)
            result.idle_lag = server.probe(reset=True)["lag"]
            t0 = time.monotonic()
            def heap() -> None:  # with every stream open, before the phones go
                if os.environ.get("STREAMS1000_HEAP"):
                    got = httpx.get(server.base + "/_probe?objects=1", timeout=120).json()
                    print(f"heap with all streams open: {got['gc_objects']} objects; {got['gc_top_types']}")

            result.streams = asyncio.run(load(server.base, streams, extra, max_tokens, spacing_s,
                                              lambda: hold(False), heap))
            result.seconds = time.monotonic() - t0
            probe = server.probe()
            result.lag, result.gc = probe["lag"], probe["gc"]
        finally:
            sampling.set()
            stop_file.touch()
            if prober is not None:
                prober.wait(30)
            server.stop()
            sim.terminate()
            sim.wait(30)
        if health_out.exists():
            samples = json.loads(health_out.read_text())
            result.idle_health_ms = [ms for t, ms, ok in samples if ok and t_idle <= t < t0]
            result.health_ms = [ms for t, ms, ok in samples if ok and t >= t0]
            result.health_failures = sum(1 for t, _, ok in samples if not ok and t >= t_idle)
    return result


def fifo_inversions(streams: list[Stream], slack_ms: float) -> tuple[int, float]:
    """(requests whose phone started them before a request that reached the server earlier, by more
    than ``slack_ms``; the largest such gap). Arrival is the server's own ``host_start_t_ms``."""
    latest, count, worst = float("-inf"), 0, 0.0
    timed = [s for s in streams if s.start_ms is not None and s.arrival_ms is not None]
    for s in sorted(timed, key=lambda s: s.arrival_ms or 0.0):
        assert s.start_ms is not None
        gap = latest - s.start_ms
        worst = max(worst, gap)
        if gap > slack_ms:
            count += 1
        latest = max(latest, s.start_ms)
    return count, worst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--extra", type=int, default=50, help="requests past the queue bound (expect 429)")
    ap.add_argument("--phones", type=int, default=4)
    ap.add_argument("--speed", type=float, default=4.0, help="simulated phone speed (default 4)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--fifo-slack-ms", type=float, default=50.0)
    ap.add_argument("--spacing-ms", type=float, default=2.0, help="between two streams being opened")
    ap.add_argument("--idle-s", type=float, default=10.0, help="idle baseline before the load")
    ap.add_argument("--state-reuse", choices=("on", "off"), default="on", help="the server's QHX_STATE_REUSE")
    args = ap.parse_args(argv)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    r = run(args.streams, args.extra, args.phones, args.speed, args.max_tokens, args.spacing_ms / 1000,
            args.idle_s, args.state_reuse)
    served = [s for s in r.streams if s.done]
    refused = [s for s in r.streams if s.status == 429 and s.error is None]
    failed = [s for s in r.streams if not s.done and not (s.status == 429 and s.error is None)]
    first_refused = min((s.index for s in refused), default=None)
    late_admits = [s.index for s in served if first_refused is not None and s.index > first_refused]
    inversions, worst = fifo_inversions(served, args.fifo_slack_ms)
    arrivals = [s.arrival_ms for s in sorted(served, key=lambda s: s.index) if s.arrival_ms is not None]
    reordered = sum(1 for a, b in itertools.pairwise(arrivals) if b < a)  # sent concurrently: informative
    rss_peak = max(r.rss_kib, default=0) / 1024
    health_p99 = pct(r.health_ms, 0.99)
    lag_p99 = r.lag.get("p99_ms", float("nan"))
    print(f"streams: {len(r.streams)} sent in {r.seconds:.0f} s: {len(served)} served, {len(refused)} clean 429, "
          f"{len(failed)} failed" + (f" (e.g. {failed[0].error})" if failed else ""))
    print(f"admitted after the first 429: {len(late_admits)}; pairs that reached the server in another order "
          f"than sent: {reordered}")
    print(f"FIFO: {inversions} requests started before an earlier arrival by more than {args.fifo_slack_ms:g} ms "
          f"(largest gap {worst:.1f} ms)")
    print(f"/health: {len(r.health_ms)} probes, p50 {pct(r.health_ms, 0.5):.1f} ms, p99 {health_p99:.1f} ms, "
          f"max {max(r.health_ms, default=float('nan')):.1f} ms, failures {r.health_failures}")
    print(f"idle baseline on this machine: /health p50 {pct(r.idle_health_ms, 0.5):.1f} ms, p99 "
          f"{pct(r.idle_health_ms, 0.99):.1f} ms; event-loop lag {r.idle_lag}")
    print(f"event-loop lag: {r.lag}")
    print(f"garbage collector pauses: {r.gc}")
    print(f"server RSS: peak {rss_peak:.0f} MiB, first {r.rss_kib[0] / 1024 if r.rss_kib else 0:.0f} MiB")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ok = (not failed and not late_admits and inversions == 0 and r.health_failures == 0
          and health_p99 < 50 and lag_p99 < 20 and rss_peak < 400)
    print("PASS" if ok else "FAIL (targets: none failed, FIFO, /health p99 < 50 ms, lag p99 < 20 ms, RSS < 400 MB)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
