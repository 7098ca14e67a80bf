"""Fixtures of the adb backend tests: simulated phones behind the real adb server, no mocks.

One private lab for this package (phones are added per purpose). Phones run at speed 0 unless a test
needs real pacing; tests that change a phone's knobs restore them with ``knobs(...)``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.backends.adb.phone import Phone
from server.backends.base import PhoneState
from server.settings import Settings
from server.sim.harness import SimLab, SimPhone
from tests.backends.adb_helpers import backend_settings, wait_state


@pytest.fixture(scope="session")
def lab() -> Iterator[SimLab]:
    with SimLab(phones=0, speed=0) as lab:
        yield lab


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="session")
def settings(lab: SimLab, tok_cache: Path) -> Settings:
    return backend_settings(lab, tok_cache)


@pytest.fixture(scope="session")
async def make_phone(lab: SimLab, settings: Settings) -> AsyncIterator[Callable[..., Awaitable[Phone]]]:
    """``await make_phone(sim=None, wait=True, **settings_overrides)`` -> a started Phone on a new (or
    the given) simulated phone; all are closed at the end of the session."""
    phones: list[Phone] = []

    async def make(sim: SimPhone | None = None, *, wait: bool = True, **overrides: Any) -> Phone:
        if sim is None:
            sim = await asyncio.to_thread(lab.add_phone)
        s = settings.model_copy(update=overrides) if overrides else settings
        phone = Phone(sim.serial, lab.adb_server, s)
        phones.append(phone)
        await phone.start()
        if wait:
            await wait_state(phone, PhoneState.READY)
        return phone

    yield make
    await asyncio.gather(*(p.aclose() for p in phones))


@pytest.fixture(scope="session")
async def phone(make_phone: Callable[..., Awaitable[Phone]]) -> Phone:
    """A well-behaved phone shared by the tests that leave it as they found it."""
    return await make_phone()


@pytest.fixture(scope="session")
async def fault_phone(make_phone: Callable[..., Awaitable[Phone]]) -> Phone:
    """A phone for crash, hang and link-drop tests (each waits for it to be READY first)."""
    return await make_phone(stall_timeout_s=1.0)


@pytest.fixture(scope="session")
async def spare_sim(lab: SimLab) -> SimPhone:
    """A simulated phone for tests that swap qhx_generate for a script via launch_command."""
    return await asyncio.to_thread(lab.add_phone)
