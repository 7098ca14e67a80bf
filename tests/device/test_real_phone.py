"""On a real phone (run with ``pytest -m device``; skipped by default).

Needs an adb server (the local one, or ``QHX_ADB_SERVERS``) with at least one phone staged as the
model card says. ``qhx-server doctor`` runs first: its report is printed (``pytest -s`` shows it; a
failing one is the failure message), and the tests need a phone it passed. Then the same stack as
production: discovery, one long-lived session, the pool.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from server.backends.base import Finished, GenerationParams, PhoneState, Started, Tokens
from server.ops.doctor.context import Options
from server.ops.doctor.runner import doctor
from server.scheduling.pool import build_backend
from server.serving.tokens import HostTokenizer
from server.settings import Settings

pytestmark = pytest.mark.device


@pytest.fixture(scope="module", autouse=True)
async def doctor_first() -> list[str]:
    """``qhx-server doctor --all --quick`` before anything else; the serials of the real phones it
    passed (its report is printed, and is the failure message when it passed none)."""
    report = await doctor(Settings(sim=0, state_reuse="off"), Options(all_phones=True, quick=True))
    print(report.render())
    passed = [p.serial for p in report.phones if p.ok and not p.simulated]
    if not passed:
        pytest.fail("qhx-server doctor passed no real phone:\n" + report.render(), pytrace=False)
    return passed


async def _ready_pool(settings: Settings, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    pool = await build_backend(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(h.state is PhoneState.READY for h in pool.health()):
            return pool
        await asyncio.sleep(0.5)
    await pool.aclose()
    pytest.fail(f"no phone became ready in {timeout:.0f} s")


async def test_a_real_phone_serves_tokens_from_its_npu(doctor_first: list[str]) -> None:
    settings = Settings(sim=0)
    pool = await _ready_pool(settings)
    try:
        [ready] = [h for h in pool.health() if h.state is PhoneState.READY][:1]
        assert not ready.simulated, "a simulated phone answered: attach a real one"
        assert ready.serial in doctor_first, f"{ready.serial} serves although doctor did not pass it"
        [model] = [m for m in pool.models() if ready.model == m.name]
        tok = HostTokenizer.from_file(model.tokenizer_path)
        params = GenerationParams(
            request_id="device-test", model=model.name, prompt_ids=tok.encode("The capital of France is"),
            max_new=16, temperature=0.0, stop_ids=[248044, 248046],
        )
        ids: list[int] = []
        events = [e async for e in pool.generate(params)]
        assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
        for event in events:
            if isinstance(event, Tokens):
                ids.extend(event.ids)
        assert events[-1].completion_tokens == len(ids) > 0
        assert tok.decode(ids).strip()
    finally:
        await pool.aclose()
