"""Ways to break a simulated phone that `qhx-server doctor` must diagnose (tests/ops/test_doctor*.py).

The adb states come from the simulated adbd's handshake, seen by the real adb server; the load
failures from the simulated runtime, as the real one fails to load a model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.sim.harness import SimLab
from server.sim.runtime import MIN_CONTEXT_BINARY
from server.sim.staging import PLACEHOLDER_SIZE, stage_phone
from tests.sim.runtime_proc import cli_args, run_cli, wq


@pytest.fixture(scope="module")
def lab() -> Iterator[SimLab]:
    with SimLab(phones=1, speed=0) as lab:
        yield lab


@pytest.mark.parametrize("state", ["unauthorized", "offline"])
def test_a_phone_can_be_listed_unauthorized_or_offline_and_come_back(lab: SimLab, state: str) -> None:
    phone = lab.phones[0]
    phone.set_adb_state(state)
    try:
        lab.wait_for_devices([phone.serial], state=state, timeout=15)
        assert f"{phone.serial}\t{state}" in lab.adb("devices").stdout
    finally:
        phone.set_adb_state("device")
    lab.wait_for_devices([phone.serial], timeout=15)
    assert lab.adb("-s", phone.serial, "shell", "echo", "back").stdout.strip() == "back"


def test_an_unauthorized_phone_stays_unauthorized_while_it_waits_for_the_prompt(lab: SimLab) -> None:
    """The host's public key gets no answer (a phone showing the prompt): no endless re-signing, so
    adb does not flicker between unauthorized and authorizing."""
    phone = lab.phones[0]
    phone.set_adb_state("unauthorized")
    try:
        lab.wait_for_devices([phone.serial], state="unauthorized", timeout=15)
        seen = set()
        for _ in range(20):
            seen.add(lab.adb("devices").stdout.split()[-1])
            time.sleep(0.1)
        assert seen == {"unauthorized"}
    finally:
        phone.set_adb_state("device")
    lab.wait_for_devices([phone.serial], timeout=15)


def test_unknown_adb_state_is_refused(lab: SimLab) -> None:
    with pytest.raises(ValueError, match="unauthorized"):
        lab.phones[0].set_adb_state("recovery")


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    stage_phone(tmp_path / "phone", sim_config={"speed": 0})
    return tmp_path / "phone"


def _load_error(sandbox: Path) -> tuple[int, str, dict[str, object]]:
    oneshot = run_cli(sandbox, cli_args(max_new=3, prompt="hi"))
    session = run_cli(sandbox, cli_args())
    [line] = session.stdout.splitlines()
    return oneshot.returncode, oneshot.stderr.decode(), json.loads(line)


def test_staged_phone_loads(sandbox: Path) -> None:
    assert MIN_CONTEXT_BINARY == PLACEHOLDER_SIZE
    assert run_cli(sandbox, cli_args(max_new=3, prompt="hi")).returncode == 0


def test_missing_skel_fails_the_load_in_both_modes(sandbox: Path) -> None:
    (wq(sandbox) / "libQnnHtpV81Skel.so").unlink()
    code, stderr, error = _load_error(sandbox)
    assert code == 1 and "libQnnHtpV81Skel.so" in stderr
    assert (error["ev"], error["id"], error["code"]) == ("error", None, "runtime")


def test_truncated_context_binary_fails_the_load_in_both_modes(sandbox: Path) -> None:
    binary = wq(sandbox) / "qwen35" / "qwen3508b_lmhead_f16.bin"
    binary.write_bytes(binary.read_bytes()[:1000])
    code, stderr, error = _load_error(sandbox)
    assert code == 1 and "qwen3508b_lmhead_f16.bin" in stderr and "truncated" in stderr
    assert "truncated" in str(error["message"])
