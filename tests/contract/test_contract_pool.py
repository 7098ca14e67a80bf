"""The Backend contract (backend_contract.py) for ``PhonePool`` (server/scheduling/pool.py) as the app
builds it (``build_backend``: an adb fleet over the configured adb server) over simulated phones."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from server.backends.base import Backend
from server.scheduling.pool import build_backend
from server.sim.harness import SimLab
from tests.contract.backend_contract import BackendContract
from tests.contract.sim_phones import all_ready, sim_settings


@pytest.fixture(scope="module")
def lab() -> Iterator[SimLab]:
    with SimLab(phones=2, speed=0) as lab:
        yield lab


@pytest.fixture(scope="module")
def spare_lab() -> Iterator[SimLab]:
    """For the pool a test closes: its phones are its own."""
    with SimLab(phones=1, speed=0) as lab:
        yield lab


@pytest.fixture(scope="module")
async def pool(lab: SimLab, tok_cache: Path) -> AsyncIterator[Backend]:
    pool = await build_backend(sim_settings(lab, tok_cache))
    await all_ready(pool, 2)
    yield pool
    await pool.aclose()


class TestPoolContract(BackendContract):
    @pytest.fixture
    def backend(self, pool: Backend) -> Backend:
        return pool

    @pytest.fixture
    def fresh_backend(self, spare_lab: SimLab, tok_cache: Path) -> Callable[[], Awaitable[Backend]]:
        async def make() -> Backend:
            pool = await build_backend(sim_settings(spare_lab, tok_cache))
            await all_ready(pool, 1)
            return pool

        return make
