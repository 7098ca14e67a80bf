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
