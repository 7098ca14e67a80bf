"""``qhx-server serve`` with a probe for the benchmarks that must look inside the server process.

    QHX_ADB_SERVERS='["127.0.0.1:PORT"]' QHX_SIM=0 QHX_PORT=8000 python benchmarks/probed_server.py

The app is the production one (``create_app`` from the ``QHX_*`` settings, uvicorn as ``serve`` runs it),
wrapped in one ASGI layer that answers ``GET /_probe`` itself (never reaching the app, its middleware or
its metrics) with what cannot be seen from outside:

* ``tasks``: asyncio tasks alive in the server's event loop, and ``task_names`` (digits folded to ``N``,
  so that per-phone and per-request names group); what the soak compares before and after to find leaks;
* ``lag``: event-loop lag since the last ``/_probe?reset=1``: a task sleeps ``LAG_TICK_S`` again and again
  and records how late it wakes (count, p50, p99, max, in ms), as a loop busy with work would delay any
  request's handling;
* ``gc``: the garbage collector's pauses per generation since that reset (count, max, total ms);
  with ``?objects=1`` also the objects it tracks (``gc_objects``) and the most common types (slow).

The probe is a benchmark tool only: production servers have no such route.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import json
import os
import re
import sys
import time
from array import array
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAG_TICK_S = 0.005
PROBE_PATH = "/_probe"


class LagMonitor:
    """Records how late a ``LAG_TICK_S`` sleep wakes up, in ms (bounded: the newest 1M samples)."""

    MAX_SAMPLES = 1_000_000

    def __init__(self) -> None:
        self.samples = array("f")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="probe-lag-monitor")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(LAG_TICK_S)
            late_ms = max(0.0, (loop.time() - t0 - LAG_TICK_S) * 1000)
            if len(self.samples) >= self.MAX_SAMPLES:
                del self.samples[: self.MAX_SAMPLES // 2]
            self.samples.append(late_ms)

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.samples)
        if not ordered:
            return {"count": 0}

        def pct(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

        return {"count": len(ordered), "p50_ms": pct(0.5), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
                "max_ms": round(ordered[-1], 2)}


class GcPauses:
    """How long the garbage collector stopped the world, per generation (a full collection over many
    live objects is a classic source of event-loop lag)."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses[info["generation"]].append((time.perf_counter() - self._t0) * 1000)

    def summary(self) -> dict[str, Any]:
        return {f"gen{g}": {"count": len(ms), "max_ms": round(max(ms, default=0.0), 2),
                            "total_ms": round(sum(ms), 1)} for g, ms in self.pauses.items()}

    def reset(self) -> None:
        for ms in self.pauses.values():
            ms.clear()


def task_report() -> dict[str, Any]:
    tasks = [t for t in asyncio.all_tasks() if not t.done()]
    names = collections.Counter(re.sub(r"\d+", "N", t.get_name()) for t in tasks)
    return {"tasks": len(tasks), "task_names": dict(sorted(names.items()))}


class Probe:
    """ASGI wrapper: ``GET /_probe`` answered here, everything else passed to the app."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lag = LagMonitor()
        self.gc = GcPauses()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            self.lag.start()
        elif scope["type"] == "http" and scope["path"] == PROBE_PATH:
            report = {**task_report(), "lag": self.lag.summary(), "gc": self.gc.summary()}
            report["tasks"] -= 1  # this probe's own request task
            if b"objects=1" in scope.get("query_string", b""):  # slow: walks the heap
                objects = gc.get_objects()
                report["gc_objects"] = len(objects)
                report["gc_top_types"] = collections.Counter(type(o).__name__ for o in objects).most_common(15)
                del objects
            if b"reset=1" in scope.get("query_string", b""):
                del self.lag.samples[:]
                self.gc.reset()
            body = json.dumps(report).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def main() -> int:
    import uvicorn

    from server.api.app import create_app
    from server.logs import configure_logging
    from server.settings import Settings

    settings = Settings()
    configure_logging(settings)
    if os.environ.get("PROBE_GC_THRESHOLD"):  # experiments: "700,10,100"
        gc.set_threshold(*(int(x) for x in os.environ["PROBE_GC_THRESHOLD"].split(",")))
    app = Probe(create_app(settings))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, log_config=None,
                access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
