"""Loading a tokenizer leaves only the tokenizer in the RSS, not the JSON parse's peak (server/memory.py).

Measured in a fresh interpreter: the RSS growth of one load. A Qwen3.5 tokenizer keeps ~80 MB; the
parse peaks at twice that, which glibc kept (so every load left ~80 MB more than needed, and the
server, which loads two, sat at 430 MB idle)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.memory import FULL_COLLECTION_AFTER, trim_heap
from server.sim.vocab import ensure_tokenizer_json

MEASURE = r"""
import sys
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
kind, path = sys.argv[1], sys.argv[2]
from server.backends.adb.retokenize import load_tokenizer
from server.serving.tokens import HostTokenizer
before = rss_mib()
keep = HostTokenizer.from_file(path) if kind == "host" else load_tokenizer(path)
print(rss_mib() - before)
"""


@pytest.mark.parametrize("kind", ["host", "phones"])
def test_a_tokenizer_load_leaves_the_tokenizer_not_the_parse_peak(kind: str) -> None:
    path = str(ensure_tokenizer_json())
    out = subprocess.run([sys.executable, "-c", MEASURE, kind, path], capture_output=True, text=True, check=True,
                         timeout=120)
    grown = float(out.stdout.strip())
    assert grown < 125, f"one {kind} tokenizer load grew the RSS by {grown:.0f} MiB"


def test_trim_heap_is_safe_to_call_any_time() -> None:
    assert trim_heap() in (True, False)
    assert trim_heap() in (True, False)


IN_FLIGHT = r"""
import gc, sys, weakref
from server.backends.adb.retokenize import load_tokenizer
from server.serving.tokens import HostTokenizer
class Request:  # what a request in flight holds: reference cycles (frames, tasks, futures)
    def __init__(self):
        self.me = self
live = [Request() for _ in range(100)]
alive = [weakref.ref(r) for r in live]
full = []
gc.callbacks.append(lambda phase, info: full.append(1) if phase == "start" and info["generation"] == 2 else None)
HostTokenizer.from_file(sys.argv[1])  # a phone plugged in with another bundle, while requests run
load_tokenizer(sys.argv[1])
loads_collected = len(full)
del live
gc.collect()
print(sum(r() is not None for r in alive), loads_collected)
"""


def test_a_tokenizer_loaded_while_requests_run_neither_keeps_their_garbage_nor_stops_the_loop() -> None:
    # the load froze every object alive (gc.freeze): the requests' cycles were never collected; and its
    # full collection walked them all, with the event loop stopped (GIL) meanwhile
    out = subprocess.run([sys.executable, "-c", IN_FLIGHT, str(ensure_tokenizer_json())], capture_output=True,
                         text=True, check=True, timeout=120)
    kept, full_collections = map(int, out.stdout.split())
    assert kept == 0, f"{kept} of 100 requests' objects outlived them"
    assert full_collections == 0


STARTED = r"""
import asyncio, gc
from server.api.app import create_app
from server.settings import Settings
from tests.serving.served_model import ServedModel
async def main():
    app = create_app(Settings(), backend=ServedModel())
    async with app.router.lifespan_context(app):
        print(gc.get_freeze_count(), len(gc.get_objects()), gc.get_threshold()[2])
asyncio.run(main())
"""


def test_what_start_up_built_is_out_of_full_collections() -> None:
    # a full collection walking every long-lived object stalled the event loop ~1 s with 1,000 streams
    env = {k: v for k, v in os.environ.items() if not k.startswith("QHX_")}
    out = subprocess.run([sys.executable, "-c", STARTED], capture_output=True, text=True, check=True, timeout=120,
                         env=env, cwd=Path(__file__).resolve().parents[1])
    frozen, tracked, full_after = map(int, out.stdout.split())
    assert frozen > 10_000, out.stdout  # the modules, the app, its services: frozen
    assert tracked < frozen // 10, out.stdout  # what a full collection still walks
    assert full_after == FULL_COLLECTION_AFTER > 10, out.stdout  # and it walks it rarely
