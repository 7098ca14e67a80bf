"""On a real phone (run with ``pytest -m device``; skipped by default).

Needs an adb server (the local one, or ``QHX_ADB_SERVERS``) with at least one phone staged as the
model card says. The same stack as production: discovery, one long-lived session, the pool.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from server.backends.base import Finished, GenerationParams, PhoneState, Started, Tokens
from server.scheduling.pool import build_backend
from server.serving.tokens import HostTokenizer
from server.settings import Settings

pytestmark = pytest.mark.device


async def _ready_pool(settings: Settings, timeout: float = 120.0):  # type: ignore[no-untyped-def]
    pool = await build_backend(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(h.state is PhoneState.READY for h in pool.health()):
            return pool
        await asyncio.sleep(0.5)
    await pool.aclose()
    pytest.fail(f"no phone became ready in {timeout:.0f} s")


async def test_a_real_phone_serves_tokens_from_its_npu() -> None:
    settings = Settings(sim=0)
    pool = await _ready_pool(settings)
    try:
        [ready] = [h for h in pool.health() if h.state is PhoneState.READY][:1]
        assert not ready.simulated, "a simulated phone answered: attach a real one"
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
