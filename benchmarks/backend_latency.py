"""The adb backend's own cost, on simulated phones behind the real adb server.

    python benchmarks/backend_latency.py [--tokens 300] [--requests 20] [--quick]

(a) added latency per token at the phone's real rate (speed 1): host monotonic clock when
    ``Phone.generate`` yields a Tokens event minus the phone's ``t_ms`` for it. The simulated runtime
    stamps ``t_ms`` with ``time.monotonic() * 1000`` just before writing the ``tok`` line, and runs on
    this host, so both are the same clock. Targets: median <= 2 ms, p99 <= 15 ms.
(b) one session's throughput with the phone at speed 0: tokens / wall time from the ``generate``
    call to ``Finished``, over back-to-back 1000-token requests. Measured twice: against the
    simulated runtime (whose own Python decode loop may be the slower side; its self-reported rate is
    printed too), and against a replay runtime (a shell script that ``cat``s a recorded event stream)
    which shows the host side's ceiling. Target >= 5,000 tok/s.
(c) time to first token over N sequential requests with the simulated 1.5 s model load: session
    mode (load paid once, at session start) vs one-shot mode (load paid by every request). Target:
    the session saves >= 95 % of the load time per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.backends.adb.phone import Phone
from server.backends.base import Finished, GenerationParams, PhoneState, Tokens
from server.settings import Settings
from server.sim.harness import SimLab
from server.sim.simconfig import write_sim_config

MODEL = "qwen3.5-0.8b"
LOAD_S = 1.5
PROMPT_IDS = [760, 6722, 314, 9338, 369, 264, 1628, 13]  # 8 tokens
PROMPT_TEXT = "The capital of France is a city that"


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"nproc {len(os.sched_getaffinity(0))}, {cpu}, load average {load}, Python {platform.python_version()}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class RemotePhone:
    """A simulated phone living in the lab process: knobs and files are reached through its sandbox."""

    def __init__(self, serial: str, sandbox: str) -> None:
        self.serial = serial
        self.sandbox = Path(sandbox)

    def configure(self, **knobs: object) -> None:
        write_sim_config(self.sandbox, knobs, merge=True)

    def phone_path(self, path: str) -> Path:
        return self.sandbox / path.lstrip("/")


def _lab_process(conn: multiprocessing.connection.Connection, kw: dict[str, object]) -> None:
    with SimLab(phones=0, **kw) as lab:  # type: ignore[arg-type]
        conn.send(lab.adb_server)
        while (msg := conn.recv()) is not None:
            phone = lab.add_phone(**msg)
            conn.send((phone.serial, str(phone.sandbox)))


class RemoteLab:
    """SimLab in a child process: the phones' adbd threads must not share this process's GIL with
    the backend under test (on a real deployment they run on the phones)."""

    def __init__(self, **kw: object) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_lab_process, args=(child, kw), daemon=True)
        self._proc.start()
        self.adb_server: str = self._conn.recv()

    def add_phone(self, **kw: object) -> RemotePhone:
        self._conn.send(kw)
        serial, sandbox = self._conn.recv()
        return RemotePhone(serial, sandbox)

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(timeout=20)


async def ready_phone(lab: RemoteLab, sim: RemotePhone, settings: Settings) -> Phone:
    phone = Phone(sim.serial, lab.adb_server, settings)
    await phone.start()
    deadline = time.monotonic() + 60
    while phone.state is not PhoneState.READY:
        if time.monotonic() > deadline:
            raise RuntimeError(f"phone not ready: {phone.health()}")
        await asyncio.sleep(0.02)
    return phone


async def added_latency(phone: Phone, tokens: int) -> tuple[list[float], int]:
    """(per-token added latency in ms, number of Tokens events that carried more than one id)."""
    lat: list[float] = []
    merged = 0
    done = 0
    n = 0
    while done < tokens:
        n += 1
        async for ev in phone.generate(
            GenerationParams(f"lat{n}", MODEL, PROMPT_IDS, min(200, tokens - done))
        ):
            if isinstance(ev, Tokens):
                lat.append(time.monotonic() * 1000 - (ev.t_ms or 0))
                merged += len(ev.ids) > 1
                done += len(ev.ids)
    return lat, merged


async def throughput(phone: Phone, requests: int) -> tuple[float, float | None]:
    """(backend tok/s wall, phone-reported tok/s) over back-to-back 1000-token requests."""
    total = 0
    phone_ms = 0.0
    t0 = time.monotonic()
    for i in range(requests):
        async for ev in phone.generate(GenerationParams(f"tp{i}", MODEL, PROMPT_IDS, 1000)):
            if isinstance(ev, Tokens):
                total += len(ev.ids)
            elif isinstance(ev, Finished):
                phone_ms += ev.prefill_ms + ev.decode_ms
    wall = time.monotonic() - t0
    return total / wall, (total / (phone_ms / 1000) if phone_ms else None)


async def ttft(phone: Phone, requests: int, text: bool) -> tuple[list[float], list[float]]:
    """(time to first token, the part of it the phone spent computing: prefill + one decode step)."""
    firsts, compute = [], []
    for i in range(requests):
        p = GenerationParams(f"tt{i}", MODEL, PROMPT_IDS, 4, prompt_text=PROMPT_TEXT if text else None)
        t0 = time.monotonic()
        first = None
        async for ev in phone.generate(p):
            if isinstance(ev, Tokens) and first is None and (ev.ids or ev.text):
                first = time.monotonic() - t0
            elif isinstance(ev, Finished) and ev.completion_tokens:
                compute.append((ev.prefill_ms + ev.decode_ms / ev.completion_tokens) / 1000)
        firsts.append(first if first is not None else float("nan"))
    return firsts, compute


def replay_script(sim: RemotePhone, tokens: int) -> str:
    """A stand-in runtime that answers every request with a recorded 1000-token event stream."""
    tmp = sim.phone_path("/data/local/tmp")
    lines = [json.dumps({"ev": "start", "id": "tp", "prompt_tokens": 8, "state_tokens": 0})]
    lines += [
        json.dumps({"ev": "tok", "id": "tp", "ids": [1000 + i % 5000], "t_ms": 0.0}) for i in range(tokens)
    ]
    lines.append(
        json.dumps(
            {
                "ev": "done",
                "id": "tp",
                "reason": "length",
                "prompt_tokens": 8,
                "completion_tokens": tokens,
                "prefill_ms": 0,
                "decode_ms": 0,
            }
        )
    )
    (tmp / "replay.jsonl").write_text("\n".join(lines) + "\n")
    ready = json.dumps({"ev": "ready", "proto": 1, "model": MODEL, "max_context": 1024})
    (tmp / "replay.sh").write_text(
        f'#!/bin/sh\necho \'{ready}\'\nwhile read line; do cat "$(dirname "$0")/replay.jsonl"; done\n'
    )
    return "sh /data/local/tmp/replay.sh {prompt}"


async def replay_throughput(phone: Phone, requests: int) -> float:
    total = 0
    t0 = time.monotonic()
    for _ in range(requests):
        async for ev in phone.generate(GenerationParams("tp", MODEL, PROMPT_IDS, 1000)):
            if isinstance(ev, Tokens):
                total += len(ev.ids)
    return total / (time.monotonic() - t0)


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    cache = Path(tempfile.mkdtemp(prefix="qhx-bench-tok-"))
    lab = RemoteLab(speed=1, sim_config={"load_s": LOAD_S})
    try:
        base = Settings(adb_servers=[lab.adb_server], tokenizer_cache=str(cache), ready_timeout_s=60)
        sim = await asyncio.to_thread(lab.add_phone)

        # (a) added latency at the real rate
        phone = await ready_phone(lab, sim, base)
        lat, merged = await added_latency(phone, args.tokens)
        print(
            f"(a) added latency per token at speed 1 (n={len(lat)}, merged events {merged}): "
            f"median {statistics.median(lat):.2f} ms, p99 {pct(lat, 0.99):.2f} ms, max {max(lat):.2f} ms "
            f"[target median <= 2, p99 <= 15]"
        )

        # (b) throughput at speed 0
        sim.configure(speed=0)
        tps, phone_tps = await throughput(phone, args.throughput_requests)
        print(
            f"(b) session throughput, simulated runtime at speed 0: {tps:,.0f} tok/s wall "
            f"(the runtime reports {phone_tps or 0:,.0f} tok/s for its own loop) [target >= 5,000]"
        )
        await phone.aclose()
        replay = await ready_phone(
            lab,
            sim,
            base.model_copy(update={"launch_command": replay_script(sim, 1000), "device_mode": "session"}),
        )
        rtps = await replay_throughput(replay, args.throughput_requests)
        print(f"    session throughput, replay runtime (host-side ceiling): {rtps:,.0f} tok/s")
        await replay.aclose()

        # (c) time to first token: session vs one-shot, 1.5 s load, speed 1
        sim.configure(speed=1)
        session_phone = await ready_phone(lab, sim, base)
        s_ttft, s_compute = await ttft(session_phone, args.requests, text=False)
        await session_phone.aclose()
        oneshot_phone = await ready_phone(lab, sim, base.model_copy(update={"device_mode": "oneshot"}))
        o_ttft, _ = await ttft(oneshot_phone, args.requests, text=True)
        await oneshot_phone.aclose()
        s_med, o_med = statistics.median(s_ttft), statistics.median(o_ttft)
        # what a session request pays beyond the phone's own compute: the load share it still carries
        overhead = statistics.median(t - c for t, c in zip(s_ttft, s_compute, strict=True))
        print(
            f"(c) time to first token over {args.requests} sequential requests, simulated load {LOAD_S} s: "
            f"session median {s_med * 1000:.0f} ms (max {max(s_ttft) * 1000:.0f}; of which phone compute "
            f"{statistics.median(s_compute) * 1000:.0f} ms, host+link {overhead * 1000:.1f} ms), one-shot "
            f"median {o_med * 1000:.0f} ms (max {max(o_ttft) * 1000:.0f}); saved per request "
            f"{(o_med - s_med) * 1000:.0f} ms; the session request carries {overhead / LOAD_S:.1%} of the "
            f"load, i.e. saves {1 - overhead / LOAD_S:.1%} of it [target >= 95%]"
        )
    finally:
        lab.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=300, help="tokens measured in (a)")
    parser.add_argument("--throughput-requests", type=int, default=10, help="1000-token requests in (b)")
    parser.add_argument("--requests", type=int, default=20, help="sequential requests per mode in (c)")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    ns = parser.parse_args()
    if ns.quick:
        ns.tokens, ns.throughput_requests, ns.requests = 40, 2, 3
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(main(ns))
