"""Multi-host failover for real: two qhx-server instances behind a LiteLLM proxy (deploy/litellm.yaml),
traffic through it with the openai client, one instance killed mid-run.

    bash scripts/litellm-venv        # once: the proxy in .venv-litellm (see that script for why)
    nice .venv/bin/python benchmarks/failover.py [--duration 120] [--kill-at 15] [--clients 6]
    nice .venv/bin/python benchmarks/failover.py --both --duration 90 --kill-at 10 --back-after 2

Processes, all on 127.0.0.1: per "bench machine", its phones (``qhx-server sim --phones 2``, their own
adb server) and its server (``qhx-server serve --sim 0 --adb-server ...``); the proxy
(``.venv-litellm/bin/litellm --config deploy/litellm.yaml``, the file as shipped, its ``os.environ/``
values pointing at the two servers); and this script: ``--clients`` loops of chat completions (half of
them streamed) through the proxy with ``openai.AsyncOpenAI`` (``max_retries=0``: every retry is the
proxy's). At ``--kill-at`` seconds the first server is SIGKILLed (its phones stay: a server process
that dies, as the OOM killer would do it).

Reported: requests per machine before and after the kill (from the proxy's ``x-litellm-model-id``
header: the deployment's ``model_info.id``), the failures the clients saw (and whether each was in
flight on the killed server: a stream already sending tokens cannot be retried by the proxy), and when
the last request reached the killed machine. The goal: no failure beyond the streams cut mid-way, and
all traffic on the survivor after the kill, for as long as the run goes on (run it past a few of the
proxy's cooldown periods: each time one runs out, the dead machine is tried again).

``--both``: both servers are SIGKILLed at ``--kill-at``, the second one started again ``--back-after``
seconds later; reported: what clients saw while none was up, when the second was ready again, and when
clients were served again (the proxy keeps a machine that failed out for ``cooldown_time``, even once
it is back). The goal: served again within the cooldown after it is back, and no failure afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import free_port

from server.sim.cli import read_banner

ROOT = Path(__file__).resolve().parents[1]
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"
MODEL = "qwen3.5-0.8b"
MASTER_KEY = "sk-failover-bench"
COOLDOWN_S = 30.0  # deploy/litellm.yaml router_settings.cooldown_time


@dataclass
class Call:
    t0: float
    t1: float = 0.0
    stream: bool = False
    machine: str | None = None  # bench-1 | bench-2 (the proxy's x-litellm-model-id)
    error: str | None = None
    tokens: int = 0


@dataclass
class Machine:
    name: str
    sim: subprocess.Popen[str]
    server: subprocess.Popen[bytes]
    url: str
    adb_server: str


@dataclass
class Run:
    calls: list[Call] = field(default_factory=list)
    killed_at: float = 0.0
    back_at: float = 0.0  # --both: when the restarted server answered /ready


def start_machine(name: str, workdir: Path, speed: float) -> Machine:
    sim = subprocess.Popen([sys.executable, "-m", "server.cli", "sim", "--phones", "2", "--speed", str(speed),
                            "--workdir", str(workdir / name), "--log-level", "warning"],
                           stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert sim.stdout is not None
    adb_server, _ = read_banner(sim.stdout)
    if adb_server is None:
        raise RuntimeError(f"{name}: qhx-server sim did not start")
    port = free_port()
    return Machine(name, sim, start_server(name, workdir, adb_server, port), f"http://127.0.0.1:{port}", adb_server)


def start_server(name: str, workdir: Path, adb_server: str, port: int) -> subprocess.Popen[bytes]:
    log = open(workdir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it)
    return subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--sim", "0", "--adb-server",
                             adb_server, "--port", str(port), "--log-level", "warning"],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} not ready within {timeout:.0f} s")


def start_proxy(machines: list[Machine], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "QHX_BENCH_1": machines[0].url + "/v1", "QHX_BENCH_2": machines[1].url + "/v1",
           "QHX_API_KEY": "none", "LITELLM_MASTER_KEY": MASTER_KEY,
           # offline: the bundled model cost map, no telemetry
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
    log = open(workdir / "litellm.log", "wb")  # noqa: SIM115 (the child keeps it)
    proxy = subprocess.Popen([str(LITELLM), "--config", str(ROOT / "deploy" / "litellm.yaml"), "--host",
                              "127.0.0.1", "--port", str(port)], env=env, cwd=workdir, stdout=log,
                             stderr=subprocess.STDOUT)
    return proxy, f"http://127.0.0.1:{port}"


async def client_loop(client: openai.AsyncOpenAI, index: int, until: float, calls: list[Call]) -> None:
    i = 0
    while time.monotonic() < until:
        i += 1
        call = Call(time.monotonic(), stream=(index + i) % 2 == 0)
        calls.append(call)
        messages = [{"role": "user", "content": f"client {index} request {i}: a short story"}]
        try:
            if call.stream:
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=messages, max_tokens=24, stream=True)  # type: ignore[arg-type]
                call.machine = raw.headers.get("x-litellm-model-id")
                async for chunk in raw.parse():
                    if chunk.choices and chunk.choices[0].delta.content:
                        call.tokens += 1
            else:
                raw = await client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=messages, max_tokens=24)  # type: ignore[arg-type]
                call.machine = raw.headers.get("x-litellm-model-id")
                out = raw.parse()
                call.tokens = out.usage.completion_tokens if out.usage else 0
        except openai.APIError as e:
            call.error = f"{type(e).__name__}: {str(e)[:160]}"
        call.t1 = time.monotonic()


async def traffic(proxy_url: str, clients: int, duration: float, kill_at: float, victims: list[Machine],
                  revive: Machine | None = None, back_after: float = 0.0, workdir: Path | None = None) -> Run:
    run = Run()
    async with openai.AsyncOpenAI(base_url=proxy_url + "/v1", api_key=MASTER_KEY, max_retries=0,
                                  timeout=120) as client:
        t0 = time.monotonic()

        async def kill() -> None:
            await asyncio.sleep(kill_at)
            for victim in victims:
                victim.server.send_signal(signal.SIGKILL)
            run.killed_at = time.monotonic()
            if revive is not None and workdir is not None:
                await asyncio.sleep(back_after)
                revive.server.wait()
                revive.server = start_server(revive.name, workdir, revive.adb_server, int(revive.url.rsplit(":", 1)[1]))
                await asyncio.to_thread(wait_ready, revive.url + "/ready")
                run.back_at = time.monotonic()

        await asyncio.gather(kill(), *(client_loop(client, i, t0 + duration, run.calls) for i in range(clients)))
    return run


def report_both(run: Run, cooldown_s: float) -> tuple[list[str], bool]:
    """--both: what clients saw while no machine was up, and how soon they were served again."""
    t = run.killed_at
    down = [c for c in run.calls if t <= c.t0 and (not run.back_at or c.t0 < run.back_at)]
    errors: dict[str, int] = {}
    for c in down:
        if c.error:
            kind = c.error.split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    served = [c.t1 for c in run.calls if c.t1 and not c.error and c.t0 >= t]
    first = min(served, default=None)
    late = [c for c in run.calls if c.error and run.back_at and c.t0 > run.back_at + cooldown_s + 2]
    lines = [f"while none was up: {len(down)} requests, errors {errors or 'none'}",
             f"bench-2 ready again {run.back_at - t:.1f} s after the kill" if run.back_at else "bench-2 never ready",
             (f"first request served again {first - t:.1f} s after the kill "
              f"({first - run.back_at:+.1f} s from bench-2 ready)") if first and run.back_at else "never served again",
             f"failed later than the cooldown ({cooldown_s:.0f} s) after bench-2 was back: {len(late)}"]
    lines += [f"  {c.error}" for c in late[:5]]
    ok = bool(run.back_at and first and first - run.back_at <= cooldown_s + 2 and not late)
    return lines, ok


def report(run: Run, victim: str) -> list[str]:
    before = [c for c in run.calls if c.t1 and c.t0 < run.killed_at]
    after = [c for c in run.calls if c.t0 >= run.killed_at]
    lines = []
    for label, calls in (("before the kill", before), ("after the kill", after)):
        by = {m: sum(1 for c in calls if c.machine == m and not c.error) for m in ("bench-1", "bench-2")}
        failed = [c for c in calls if c.error]
        lines.append(f"{label}: {len(calls)} requests, served by bench-1 {by['bench-1']}, bench-2 {by['bench-2']}; "
                     f"failed {len(failed)}")
    cut = [c for c in run.calls if c.error and c.t0 < run.killed_at <= c.t1]
    other = [c for c in run.calls if c.error and c not in cut]
    lines.append(f"failed while in flight at the kill: {len(cut)} "
                 f"({sum(c.stream and c.machine == victim for c in cut)} streams already on {victim})")
    lines.append(f"failed otherwise: {len(other)}")
    lines += [f"  {c.error}" for c in (cut + other)[:10]]
    last = max((c.t0 for c in run.calls if c.machine == victim and not c.error), default=None)
    if last is not None:
        lines.append(f"last request started on {victim}: {last - run.killed_at:+.2f} s from the kill")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    ap.add_argument("--kill-at", type=float, default=15.0, help="seconds into the traffic")
    ap.add_argument("--both", action="store_true", help="kill both servers, then start the second again")
    ap.add_argument("--back-after", type=float, default=2.0, help="--both: seconds until the restart")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--speed", type=float, default=2.0, help="simulated phone speed")
    args = ap.parse_args(argv)
    if not LITELLM.exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "litellm-venv")], check=True)
    version = subprocess.run([str(LITELLM.with_name("python")), "-c",
                              "import importlib.metadata as m; print(m.version('litellm'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    procs: list[subprocess.Popen[bytes] | subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="qhx-failover-") as tmp:
        work = Path(tmp)
        try:
            machines = [start_machine(f"bench-{i}", work, args.speed) for i in (1, 2)]
            procs += [p for m in machines for p in (m.server, m.sim)]
            for m in machines:
                wait_ready(m.url + "/ready")
            proxy, proxy_url = start_proxy(machines, work)
            procs.insert(0, proxy)
            wait_ready(proxy_url + "/health/liveliness", timeout=300)
            what = (f"both SIGKILLed at {args.kill_at:.0f} s, bench-2 started again {args.back_after:g} s later"
                    if args.both else f"bench-1 SIGKILLed at {args.kill_at:.0f} s")
            print(f"litellm {version}; two qhx-server instances with 2 simulated phones each (speed "
                  f"{args.speed:g}); {args.clients} clients for {args.duration:.0f} s; {what}; load average "
                  f"{os.getloadavg()[0]:.2f}")
            if args.both:
                run = asyncio.run(traffic(proxy_url, args.clients, args.duration, args.kill_at, machines,
                                          revive=machines[1], back_after=args.back_after, workdir=work))
                lines, ok = report_both(run, COOLDOWN_S)
            else:
                run = asyncio.run(traffic(proxy_url, args.clients, args.duration, args.kill_at, machines[:1]))
                lines = report(run, "bench-1")
                failed_other = sum(1 for c in run.calls if c.error and not (c.t0 < run.killed_at <= c.t1))
                late = [c for c in run.calls if c.machine == "bench-1" and c.t0 > run.killed_at + 1 and not c.error]
                ok = failed_other == 0 and not late
        finally:
            procs = [p for m in machines for p in (m.server, m.sim) if p not in procs] + procs  # restarted ones
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    for line in lines:
        print(line)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
