"""Thermal-aware scheduling (issue 14): time per output token with ``--thermal-routing on`` vs ``off``.

Both arms in one run, each on fresh processes as in production: ``qhx-server sim --phones 8 --speed 1``
(22.7 tok/s fp16 per phone, no natural stop: every answer runs to ``max_tokens``; the phones' bodies
evolve in real time: server/sim/physics.py defaults, a 25 °C room, +15 °C under continuous decoding,
a 300 s time constant), ``qhx-server serve --thermal-routing on|off --telemetry-poll-s 5`` and this
client. Before the clients start, ``--hot`` phones are put at ``--hot-temp`` (sim knob ``temp_c``) and
the others at the room's temperature, and the server has read them. Then ``--clients`` streaming chat
clients (``openai.AsyncOpenAI``, a one-line question, ``--max-tokens`` answers) ask one after another
for ``--minutes``; requests under way at the end finish and count.

TPOT per request = (last token - first token) / (completion tokens - 1), on the client's clock.
Targets (issue 14): p95 TPOT with thermal routing on at least 20 % lower than off, and zero errors
in both. ``scripts/health_plot.py`` samples each arm's ``/v1/devices`` every 5 s; its plots (PNG) go to
``--out`` (docs/img/ for the docs).

    nice .venv/bin/python benchmarks/thermal.py [--minutes 10] [--phones 8] [--hot 2] [--clients 24]
        [--max-tokens 128] [--hot-temp 50] [--arms off,on] [--out docs/img]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import openai
from stack import Stack, machine_info

from server.sim.simconfig import write_sim_config

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ("bread", "rivers", "trains", "the moon", "bees", "glass", "chess", "tea", "maps", "clocks", "salt",
          "bridges")


def load_health_plot() -> ModuleType:
    spec = importlib.util.spec_from_file_location("health_plot", ROOT / "scripts" / "health_plot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["health_plot"] = module
    spec.loader.exec_module(module)
    return module


@dataclass
class Arm:
    name: str
    ttft_s: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phones: list[dict[str, Any]] = field(default_factory=list)  # /v1/devices at the end
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)


async def ask(client: openai.AsyncOpenAI, model: str, max_tokens: int, rng: random.Random, arm: Arm) -> None:
    """One streamed chat request; its TTFT and TPOT into ``arm`` (or its error)."""
    t0 = time.monotonic()
    first = last = None
    tokens = 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Tell me a story about {rng.choice(TOPICS)}."}],
            max_completion_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.monotonic()
                first = first or last
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except (openai.OpenAIError, httpx.HTTPError) as e:
        arm.errors.append(f"{type(e).__name__}: {e}"[:200])
        return
    arm.requests += 1
    arm.tokens += tokens
    if first is None or last is None or tokens < 2:
        arm.errors.append(f"answer of {tokens} tokens")
        return
    arm.ttft_s.append(first - t0)
    arm.tpot_ms.append((last - first) / (tokens - 1) * 1000)


async def client_loop(base_url: str, model: str, until: float, max_tokens: int, seed: int, arm: Arm) -> None:
    rng = random.Random(seed)
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=600) as client:
        while time.monotonic() < until:
            await ask(client, model, max_tokens, rng, arm)


async def load(base_url: str, model: str, clients: int, seconds: float, max_tokens: int, arm: Arm) -> None:
    until = time.monotonic() + seconds
    t0 = time.monotonic()
    await asyncio.gather(*(client_loop(base_url, model, until, max_tokens, i, arm) for i in range(clients)))
    arm.seconds = time.monotonic() - t0


def set_bodies(stack: Stack, hot: int, hot_temp: float) -> None:
    """The first ``hot`` phones at ``hot_temp``, the others rested; waits until the server has read them."""
    for i, sandbox in enumerate(stack.sandboxes):
        write_sim_config(sandbox, {"temp_c": hot_temp if i < hot else 25.0, "battery_pct": 100})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = sorted((p.get("temperature_c") or 0.0 for p in stack.devices()), reverse=True)
        if len(temps) == stack.n and all(t >= hot_temp - 1.5 for t in temps[:hot]) and all(
                t <= 30 for t in temps[hot:]):
            return
        time.sleep(0.5)
    raise RuntimeError(f"the server never saw the phones' temperatures: {stack.devices()}")


def run_arm(name: str, args: argparse.Namespace, plot: ModuleType, workdir: Path) -> Arm:
    arm = Arm(name)
    serve_args = ["--thermal-routing", name, "--telemetry-poll-s", "5", "--queue-timeout-s", "900",
                  "--max-queue", str(max(64, args.clients * 2))]
    with Stack(workdir / name, args.phones, serve_args=serve_args) as stack:
        set_bodies(stack, args.hot, args.hot_temp)
        samples = args.out / f"thermal-{name}.jsonl"
        samples.unlink(missing_ok=True)
        stop = threading.Event()
        sampler = threading.Thread(target=plot.sample, args=(stack.base_url, samples),
                                   kwargs={"every": 5.0, "stop": stop}, daemon=True)
        sampler.start()
        print(f"[{name}] {args.clients} clients for {args.minutes} min ...", flush=True)
        asyncio.run(load(stack.base_url, stack.model, args.clients, args.minutes * 60, args.max_tokens, arm))
        arm.phones = stack.devices()
        arm.load = os.getloadavg()
        stop.set()
        sampler.join(15)
    hot = f"{args.hot} of {args.phones} phones started at {args.hot_temp:g} °C"
    plot.plot(plot.read_samples(samples), args.out / f"thermal-{name}.png",
              title=f"thermal routing {name}: {hot}, {args.clients} streaming clients")
    return arm


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1)]


def report(arms: dict[str, Arm], args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n{machine_info()}")
    print(f"{args.phones} phones ({args.hot} at {args.hot_temp:g} °C), {args.clients} clients, "
          f"{args.minutes} min per arm, {args.max_tokens} tokens per answer\n")
    print("arm  requests errors  TPOT p50 / p95 / max (ms)   TTFT p50 / p95 (s)  tok/s   load avg (1/5/15)")
    out: dict[str, Any] = {}
    for name, arm in arms.items():
        row = {
            "requests": arm.requests, "errors": len(arm.errors), "tpot_p50_ms": pct(arm.tpot_ms, 50),
            "tpot_p95_ms": pct(arm.tpot_ms, 95), "tpot_max_ms": max(arm.tpot_ms, default=math.nan),
            "ttft_p50_s": pct(arm.ttft_s, 50), "ttft_p95_s": pct(arm.ttft_s, 95),
            "tokens_per_s": arm.tokens / arm.seconds if arm.seconds else math.nan, "load": arm.load,
            "tokens_by_phone": {p["serial"]: p["tokens_served"] for p in arm.phones},
            "decode_tps_by_phone": {p["serial"]: p["decode_tps"] for p in arm.phones},
            "temperature_by_phone": {p["serial"]: p["temperature_c"] for p in arm.phones},
        }
        out[name] = row
        print(f"{name:4} {row['requests']:8} {row['errors']:6}  {row['tpot_p50_ms']:7.1f} / {row['tpot_p95_ms']:6.1f} / "
              f"{row['tpot_max_ms']:6.1f}      {row['ttft_p50_s']:6.2f} / {row['ttft_p95_s']:6.2f}    "
              f"{row['tokens_per_s']:6.1f}  {'/'.join(f'{x:.1f}' for x in arm.load)}")
        for e in arm.errors[:5]:
            print(f"     error: {e}")
    if "on" in out and "off" in out:
        gain = 1 - out["on"]["tpot_p95_ms"] / out["off"]["tpot_p95_ms"]
        errors = out["on"]["errors"] + out["off"]["errors"]
        out["p95_tpot_lower_by"] = gain
        print(f"\np95 TPOT with thermal routing on is {gain:.0%} lower than off (target >= 20 %); "
              f"errors {errors} (target 0): {'MET' if gain >= 0.2 and errors == 0 else 'MISSED'}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--phones", type=int, default=8)
    parser.add_argument("--hot", type=int, default=2)
    parser.add_argument("--hot-temp", type=float, default=50.0)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--arms", default="off,on")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    plot = load_health_plot()
    arms: dict[str, Arm] = {}
    with tempfile.TemporaryDirectory(prefix="qhx-thermal-") as tmp:
        for name in args.arms.split(","):
            arms[name] = run_arm(name, args, plot, Path(tmp))
    result = report(arms, args)
    (args.out / "thermal-result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if result.get("p95_tpot_lower_by", 1.0) >= 0.2 and all(a.errors == [] for a in arms.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
