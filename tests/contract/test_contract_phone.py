"""The Backend contract (backend_contract.py) for one ``Phone`` (server/backends/adb/phone.py) on a
simulated phone behind the real adb server, in each of its modes (a session; one-shot runs)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from server.backends.adb.phone import Phone
from server.backends.base import Backend
from server.sim.harness import SimLab
from tests.contract.backend_contract import BackendContract
from tests.contract.sim_phones import all_ready, sim_settings

MakePhone = Callable[..., Awaitable[Backend]]


@pytest.fixture(scope="module")
def lab() -> Iterator[SimLab]:
    with SimLab(phones=0, speed=0) as lab:
        yield lab


@pytest.fixture(scope="module")
async def make_phone(lab: SimLab, tok_cache: Path) -> AsyncIterator[MakePhone]:
    """``await make_phone(**settings_overrides)``: a started, ready Phone on a new simulated phone; all
    are closed at the end of the module."""
    made: list[Phone] = []

    async def make(**overrides: Any) -> Backend:
        sim = await asyncio.to_thread(lab.add_phone)
        phone = Phone(sim.serial, lab.adb_server, sim_settings(lab, tok_cache).model_copy(update=overrides))
        made.append(phone)
        await phone.start()
        await all_ready(phone, 1)
        return phone

    yield make
    await asyncio.gather(*(p.aclose() for p in made))


@pytest.fixture(scope="module")
async def session_phone(make_phone: MakePhone) -> Backend:
    return await make_phone(device_mode="session")


@pytest.fixture(scope="module")
async def oneshot_phone(make_phone: MakePhone) -> Backend:
    return await make_phone(device_mode="oneshot")


class TestSessionPhoneContract(BackendContract):
    @pytest.fixture
    def backend(self, session_phone: Backend) -> Backend:
        return session_phone

    @pytest.fixture
    def fresh_backend(self, make_phone: MakePhone) -> Callable[[], Awaitable[Backend]]:
        return lambda: make_phone(device_mode="session")


class TestOneShotPhoneContract(BackendContract):
    @pytest.fixture
    def backend(self, oneshot_phone: Backend) -> Backend:
        return oneshot_phone

    @pytest.fixture
    def fresh_backend(self, make_phone: MakePhone) -> Callable[[], Awaitable[Backend]]:
        return lambda: make_phone(device_mode="oneshot")
