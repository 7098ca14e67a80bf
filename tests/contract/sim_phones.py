"""Simulated phones for the contract modules that run a real backend: a SimLab's phones behind the
real adb server (no mocks), at speed 0, with short timeouts so that a broken step fails fast."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from server.backends.base import Backend, PhoneState
from server.settings import Settings
from server.sim.harness import SimLab


def sim_settings(lab: SimLab, cache: Path) -> Settings:
    return Settings(
        adb_servers=[lab.adb_server], sim=0, tokenizer_cache=str(cache), ready_timeout_s=30.0,
        stall_timeout_s=3.0, cancel_timeout_s=2.0, restart_backoff_max_s=0.2, adb_timeout_s=5.0,
        device_poll_s=0.2,
    )


async def until(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"{what} not reached in {timeout} s"
        await asyncio.sleep(0.02)


async def all_ready(backend: Backend, phones: int) -> None:
    """Until the backend shows ``phones`` phones, all ready."""
    await until(f"{phones} phone(s) ready", lambda: len(backend.health()) == phones and all(
        h.state is PhoneState.READY for h in backend.health()))
