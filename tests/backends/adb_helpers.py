"""Helpers of the adb backend tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.backends.adb.phone import Phone
from server.backends.base import PhoneState
from server.settings import Settings
from server.sim.harness import SimLab, SimPhone
from server.sim.simconfig import DEFAULTS

FAULTS_OFF: dict[str, Any] = {
    "crash_after": None,
    "hang": False,
    "garbage": False,
    "slow_first_token_s": 0.0,
    "no_session": False,
    "speed": 0,
}


def backend_settings(lab: SimLab, cache: Path, **overrides: Any) -> Settings:
    """Settings for phones of ``lab``: short timeouts and backoff so that fault tests stay fast."""
    values: dict[str, Any] = {
        "adb_servers": [lab.adb_server],
        "tokenizer_cache": str(cache),
        "ready_timeout_s": 30.0,
        "stall_timeout_s": 3.0,
        "cancel_timeout_s": 2.0,
        "restart_backoff_max_s": 0.2,
        "quarantine_s": 0.2,
        "quarantine_max_s": 0.5,
        "adb_timeout_s": 5.0,
        "device_poll_s": 0.2,
        **overrides,
    }
    return Settings(**values)


async def wait_state(phone: Phone, *states: PhoneState, timeout: float = 30.0) -> None:
    """Wait until the phone is in one of ``states``; fail with its health otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while phone.state not in states:
        if loop.time() > deadline:
            pytest.fail(f"{phone} not {[s.value for s in states]} after {timeout} s: {phone.health()}")
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def knobs(sim: SimPhone, **values: Any) -> Iterator[None]:
    """Set simulator knobs for the block, then put back what the phone had before (a knob it did not
    set: the simulator's default) and the fault defaults of this package. (Putting back only the
    latter left e.g. ``stop_rate`` 0 on the phone: its later replies then ran longer than a reference
    phone's, depending on where a cancel cut the earlier reply.)"""
    path = sim.sandbox / "sim.json"
    before = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    sim.configure(**values)
    try:
        yield
    finally:
        back = {key: before[key] if key in before else DEFAULTS[key] for key in values
                if key in before or key in DEFAULTS}
        sim.configure(**{**back, **FAULTS_OFF})


def sim_of(lab: SimLab, phone: Phone) -> SimPhone:
    return next(p for p in lab.phones if p.serial == phone.serial)
