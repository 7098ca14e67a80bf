"""Phone pool under load: N simulated phones at their real rate, M concurrent streaming clients.

Three processes, as in production: the phones (``qhx-server sim --phones N --speed 1``, with a private
adb server), the server (``qhx-server serve --sim 0 --adb-server ...``, measured from /proc) and this
client (M asyncio tasks on one ``openai.AsyncOpenAI``, each streaming ``/v1/completions`` back to
back). Phones never stop early (``stop_rate`` 0): every request runs to ``--max-tokens``.

Measured over the window [clients start, + --duration s] (new requests stop at its end; those in
flight finish and count for their tokens inside the window):

* aggregate tokens/s received by the clients (a request's tokens are placed at its chunks' arrival
  times), against the target 0.95 x N x 22.7 tok/s (the fp16 rate of one phone, SM8850 model card);
  cross-checked with the phones' own ``tokens_served`` counters from /v1/devices;
* errors (target: none); queue wait p50/p99 (the server's ``queue_ms``: request to the phone's
  ``start``, from ``return_timings``) and time to first token;
* the server process: CPU (user + system over the window) and RSS (current and peak), from /proc.

    .venv/bin/python benchmarks/pool_load.py [--duration 60] [--phones 8] [--clients 32] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from stack import Stack, machine_info, process_cpu_s

from server.sim.simconfig import DECODE_TPS

PROMPT = "Once upon a time"
IDLE_S = 5.0


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


@dataclass
class Request:
    t_sent: float
    chunks: list[float] = field(default_factory=list)  # arrival times of chunks with text
    tokens: int = 0  # usage.completion_tokens
    queue_ms: float | None = None
    error: str | None = None

    def tokens_between(self, t0: float, t1: float) -> float:
        """This request's tokens that arrived in [t0, t1], spread evenly over its text chunks."""
        if not self.chunks:
            return 0.0
        per_chunk = self.tokens / len(self.chunks)
        return per_chunk * sum(1 for t in self.chunks if t0 <= t <= t1)


class Probe:
    """Server CPU, RSS and the phones' counters at the start and the end of the window."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.start: dict[str, Any] = {}
        self.stop: dict[str, Any] = {}

    def sample(self) -> dict[str, Any]:
        assert self.stack.srv is not None and self.stack.sim is not None
        pid = self.stack.srv.pid
        return {
            "t": time.monotonic(), "cpu": process_cpu_s(pid), "sim_cpu": process_cpu_s(self.stack.sim.pid),
            "rss": rss_kib(pid), "served": {p["serial"]: p["tokens_served"] for p in self.stack.devices()},
        }

    def __call__(self) -> None:
        self.start = self.sample()

    def end(self) -> None:
        self.stop = self.sample()


async def client_loop(client: openai.AsyncOpenAI, model: str, max_tokens: int, until: float,
                      out: list[Request]) -> None:
    while time.monotonic() < until:
        req = Request(time.monotonic())
        out.append(req)
        try:
            stream = await client.completions.create(
                model=model, prompt=PROMPT, max_tokens=max_tokens, stream=True,
                stream_options={"include_usage": True}, extra_body={"return_timings": True},
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    req.chunks.append(time.monotonic())
                if chunk.choices and chunk.choices[0].finish_reason:
                    timings = (chunk.model_extra or {}).get("timings") or {}
                    req.queue_ms = timings.get("queue_ms")
                if chunk.usage is not None:
                    req.tokens = chunk.usage.completion_tokens
        except openai.APIError as e:
            req.error = f"{type(e).__name__}: {e}"


async def load(base_url: str, model: str, clients: int, duration: float, max_tokens: int,
               probe: Probe) -> tuple[list[Request], float, float]:
    requests: list[Request] = []
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0,
                                  timeout=600) as client:
        t0 = time.monotonic()
        probe()
        loops = [asyncio.ensure_future(client_loop(client, model, max_tokens, t0 + duration, requests))
                 for _ in range(clients)]
        await asyncio.sleep(duration)
        t1 = time.monotonic()
        on_end = asyncio.get_running_loop().run_in_executor(None, probe.end)
        await asyncio.gather(*loops)
        await on_end
    return requests, t0, t1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    ap.add_argument("--phones", type=int, default=8, help="simulated phones at speed 1 (default 8)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (default 32)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per request (default 256)")
    args = ap.parse_args()

    print(f"machine: {machine_info()}; load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="qhx-bench-") as tmp, Stack(Path(tmp), args.phones) as stack:
        print(f"server {stack.base_url}, model {stack.model}, {args.phones} phones at speed 1, "
              f"{args.clients} clients x {args.max_tokens}-token streams for {args.duration:g} s")
        probe = Probe(stack)
        assert stack.srv is not None
        idle0 = process_cpu_s(stack.srv.pid)
        time.sleep(IDLE_S)  # what the server burns with no request (device polls, tokenizer warm-up loop)
        idle_cpu = (process_cpu_s(stack.srv.pid) - idle0) / IDLE_S
        requests, t0, t1 = asyncio.run(load(stack.base_url, stack.model, args.clients, args.duration,
                                            args.max_tokens, probe))
        after = stack.devices()
        load_avg = os.getloadavg()[0]

    window = t1 - t0
    received = sum(r.tokens_between(t0, t1) for r in requests)
    served = {s: probe.stop["served"][s] - probe.start["served"].get(s, 0) for s in probe.stop["served"]}
    target = 0.95 * args.phones * DECODE_TPS["fp16"]
    errors = [r.error for r in requests if r.error]
    waits = [r.queue_ms for r in requests if r.queue_ms is not None]
    ttfts = [(r.chunks[0] - r.t_sent) * 1000 for r in requests if r.chunks]
    cpu = probe.stop["cpu"] - probe.start["cpu"]
    sim_cpu = probe.stop["sim_cpu"] - probe.start["sim_cpu"]
    phone_tps = [p["last_decode_tps"] for p in after if p["last_decode_tps"]]
    rate = received / window

    print(f"\nrequests: {len(requests)} ({sum(1 for r in requests if r.tokens)} completed), "
          f"errors: {len(errors)}")
    for e in errors[:5]:
        print(f"   {e}")
    print(f"aggregate tokens/s received by the clients: {rate:.1f} "
          f"(target >= {target:.1f} = 0.95 x {args.phones} x {DECODE_TPS['fp16']}; "
          f"{100 * rate / (args.phones * DECODE_TPS['fp16']):.1f} % of {args.phones} phones' nominal rate)")
    print(f"   the phones' own counters over the window: {sum(served.values()) / window:.1f} tok/s; per phone "
          f"min {min(served.values()) / window:.1f}, max {max(served.values()) / window:.1f}")
    print(f"   decode tok/s the phones report (last request): median {statistics.median(phone_tps):.2f}")
    print(f"queue wait (request -> phone start): p50 {percentile(waits, 0.5):.0f} ms, "
          f"p99 {percentile(waits, 0.99):.0f} ms, max {max(waits):.0f} ms (n={len(waits)})")
    print(f"time to first token (client): p50 {percentile(ttfts, 0.5):.0f} ms, p99 {percentile(ttfts, 0.99):.0f} ms")
    busy = cpu - idle_cpu * window
    print(f"server process: CPU {cpu:.1f} s over {window:.1f} s ({100 * cpu / window:.1f} % of one core; idle "
          f"{100 * idle_cpu:.1f} %; the rest is {busy / max(received, 1) * 1e6:.0f} us per token); "
          f"RSS {probe.stop['rss'][0] / 1024:.0f} MiB (peak {probe.stop['rss'][1] / 1024:.0f} MiB; "
          f"{probe.start['rss'][0] / 1024:.0f} MiB at the start)")
    print(f"phones' process (qhx-server sim: adbd threads, not the runtimes): CPU {100 * sim_cpu / window:.1f} % "
          f"of one core; load average at the end {load_avg:.2f}")
    ok = rate >= target and not errors
    print(f"\n{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
