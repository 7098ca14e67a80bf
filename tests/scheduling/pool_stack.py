"""The whole stack for the pool's end-to-end tests: the official openai client -> uvicorn -> create_app
-> the pool -> two real adb servers -> six simulated phones.

    adb server A: a1 a2 a3 (fp16)   a4 (fp16 + w8 bundles, serves w8 through ``bundle_for``)
    adb server B: b1 (fp16 + w8 bundles, serves fp16 by default)   b2 (w8)

so the fp16 model has four phones on two adb servers and the w8 model two. Phones run at speed 0
with no natural stop unless a test sets knobs (``PoolStack.knobs``, restored after each test).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab, SimPhone
from tests.api.live_server import BASE_KNOBS, OpenAIClients, ServerThread

FP16 = "qwen3.5-0.8b"
W8 = "qwen3.5-0.8b-w8"
FAULTS_OFF: dict[str, Any] = {**BASE_KNOBS, "slow_first_token_s": 0.0, "crash_after": None, "hang": False}


@dataclass
class PoolStack(OpenAIClients):
    base_url: str
    labs: list[SimLab]
    settings: Settings
    named: dict[str, SimPhone]  # a1..a4, b1, b2 as drawn above
    app: Any = field(default=None, repr=False)
    _client: openai.OpenAI | None = field(default=None, repr=False)

    # -- phones ---------------------------------------------------------------------------------

    @property
    def sims(self) -> list[SimPhone]:
        return [p for lab in self.labs for p in lab.phones]

    def sim(self, name: str) -> SimPhone:
        """a1..a4, b1, b2 (the phones drawn in the module docstring)."""
        return self.named[name]

    @contextmanager
    def knobs(self, sims: list[SimPhone] | None = None, **knobs: Any) -> Iterator[None]:
        """Set simulator knobs on some phones (default: all) for the block; faults off afterwards."""
        chosen = self.sims if sims is None else sims
        for sim in chosen:
            sim.configure(**knobs)
        try:
            yield
        finally:
            for sim in self.sims:
                sim.configure(**FAULTS_OFF)

    @contextmanager
    def tuned(self, **values: Any) -> Iterator[None]:
        """Pool settings for the block (the pool reads them per request)."""
        old = {k: getattr(self.settings, k) for k in values}
        for k, v in values.items():
            setattr(self.settings, k, v)
        try:
            yield
        finally:
            for k, v in old.items():
                setattr(self.settings, k, v)

    def pool_audit(self) -> list[str]:
        """The server's ``PhonePool.audit()``. Read from the test's thread: only when nothing runs
        (every phone idle, no request in flight), when the pool's dicts do not change."""
        problems: list[str] = self.app.state.backend.audit()
        return problems

    # -- HTTP -----------------------------------------------------------------------------------

    def devices(self) -> dict[str, dict[str, Any]]:
        """/v1/devices by serial."""
        data = httpx.get(self.base_url + "/v1/devices", timeout=5).json()["data"]
        return {d["serial"]: d for d in data}

    def device(self, sim: SimPhone) -> dict[str, Any]:
        return self.devices()[sim.serial]

    def wait_devices(self, what: str, predicate: Callable[[dict[str, dict[str, Any]]], bool],
                     timeout: float = 20.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            devices = self.devices()
            if predicate(devices):
                return devices
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached in {timeout} s: {devices}")
            time.sleep(0.05)

    def wait_all_idle(self, timeout: float = 20.0) -> None:
        self.wait_devices("every phone ready and idle", lambda ds: all(
            d["state"] == "ready" and d["request_in_flight"] is None for d in ds.values()
            if d["state"] != "offline"
        ), timeout)


@contextmanager
def pool_stack() -> Iterator[PoolStack]:
    with ExitStack() as stack:
        lab_a = stack.enter_context(SimLab(phones=3, speed=0, sim_config=BASE_KNOBS))
        lab_b = stack.enter_context(SimLab(phones=0, speed=0, sim_config=BASE_KNOBS))
        a4 = lab_a.add_phone(precision="both")
        lab_b.add_phone(precision="both")
        lab_b.add_phone(precision="w8")
        settings = Settings(
            adb_servers=[lab_a.adb_server, lab_b.adb_server], sim=0,
            bundle_for=[f"{lab_a.adb_server}/{a4.serial}=qwen35-w8"],
            device_poll_s=0.2, restart_backoff_max_s=0.2, quarantine_s=1.0, quarantine_max_s=2.0,
            stall_timeout_s=3.0, cancel_timeout_s=2.0, ready_timeout_s=30.0, sse_ping_s=0.25,
            queue_timeout_s=30.0,
        )
        app = create_app(settings)
        server = stack.enter_context(ServerThread(app))
        named = {f"a{i + 1}": p for i, p in enumerate(lab_a.phones)}
        named.update({f"b{i + 1}": p for i, p in enumerate(lab_b.phones)})
        ps = PoolStack(f"http://127.0.0.1:{server.port}", [lab_a, lab_b], settings, named, app)
        ps.wait_devices("six phones ready", lambda ds: len(ds) == 6 and all(
            d["state"] == "ready" for d in ds.values()), timeout=60)
        for model in (FP16, W8):  # the tokenizer loads once for both (same tokenizer.json)
            httpx.post(ps.base_url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1},
                       timeout=60).raise_for_status()
        yield ps
        if ps._client is not None:
            ps._client.close()
