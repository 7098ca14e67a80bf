"""Shared fixtures. Keep this small: fixtures of one area live next to its tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.sim.harness import SimLab


@pytest.fixture(scope="session")
def sim_lab() -> Iterator[SimLab]:
    """One private adb server with one simulated phone, shared by the whole session (start ~0.2 s).

    Tests that break phones (faults, teardown) add their own phone or lab instead of touching this one.
    """
    with SimLab(phones=1) as lab:
        yield lab


# The test files that take longest (pytest --durations, summed per file), longest first: they run first,
# so that the suite on pytest-xdist workers (scripts/test: a file per worker) does not end waiting for a
# long file that started last. A file not listed keeps its place after them.
SLOW_FIRST = (
    "tests/soak/test_soak.py",
    "tests/api/test_state_reuse_e2e.py",
    "tests/backends/adb/test_state_reuse.py",
    "tests/scheduling/test_pool_e2e.py",
    "tests/console/test_playground.py",
    "tests/api/test_devices_events.py",
    "tests/api/test_completions_oneshot.py",
    "tests/test_shutdown.py",
    "tests/backends/adb/test_runtime_seam.py",
    "tests/ops/test_doctor.py",
    "tests/api/test_adb_restart.py",
    "tests/ops/test_provision.py",
    "tests/console/test_farm.py",
    "tests/backends/adb/test_oneshot.py",
    "tests/backends/adb/test_telemetry.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
