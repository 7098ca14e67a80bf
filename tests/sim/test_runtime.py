"""The simulated ``qhx_generate`` as a command: one-shot CLI, usage errors, load, arch pin, faults.

Session protocol details are in test_session.py; here each test starts its own process.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.sim.harness import SimLab
from server.sim.staging import stage_phone
from server.sim.vocab import load_tokenizer, token_bytes
from tests.sim.runtime_proc import ENDOFTEXT, IM_END, RuntimeSession, cli_args, phone_env, run_cli, toks, wq

MODEL_CARD_LINE = (
    "cd {root} && LD_LIBRARY_PATH=. ./qhx_generate qwen35/qwen3.5-0.8b-1024.json libQnnHtp.so "
    "libQnnSystem.so qwen35 64 'The capital of France is'"
)
STATS = b"[qhx] prefill "

Stage = Callable[..., Path]


@pytest.fixture
def stage(tmp_path: Path) -> Stage:
    """Stage a fresh phone sandbox with the given knobs (speed 0 unless told)."""

    def make(*, soc: str = "SM8850", precision: str = "fp16", **knobs: Any) -> Path:
        sandbox = tmp_path / f"phone-{soc}-{precision}"
        stage_phone(sandbox, soc=soc, precision=precision, sim_config={"speed": 0, **knobs})
        return sandbox

    return make


def test_model_card_line_prints_text_and_exits_0(stage: Stage) -> None:
    sandbox = stage()
    result = subprocess.run(["/bin/sh", "-c", MODEL_CARD_LINE.format(root=wq(sandbox))], env=phone_env(sandbox),
                            capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode("utf-8")
    assert text.strip()
    assert STATS in result.stderr and b"tok/s" in result.stderr


def test_one_shot_output_is_the_greedy_session_output_as_raw_bytes(stage: Stage) -> None:
    sandbox = stage()
    prompt = "The capital of France is"
    # The three tokenizer loads (session, one-shot, ours) overlap: each takes seconds.
    session = RuntimeSession(sandbox)
    oneshot = subprocess.Popen(["./qhx_generate", *cli_args(max_new=64, prompt=prompt)], cwd=wq(sandbox),
                               env=phone_env(sandbox), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    try:
        tokenizer = load_tokenizer()
        stdout, _ = oneshot.communicate(timeout=60)
        assert oneshot.returncode == 0
        assert session.recv()["ev"] == "ready"
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        events = session.generate("x", ids, 64, temperature=0, stop_ids=[ENDOFTEXT, IM_END])
    finally:
        session.kill()
        if oneshot.poll() is None:
            oneshot.kill()
            oneshot.communicate()
    assert stdout == b"".join(token_bytes(tokenizer, i) for i in toks(events))


def test_one_shot_pays_load_and_decode_time(stage: Stage) -> None:
    sandbox = stage(speed=1, load_s=0.5, decode_tps=40, stop_rate=0)
    t0 = time.monotonic()
    result = run_cli(sandbox, cli_args(max_new=20, prompt="Hello"))
    elapsed = time.monotonic() - t0
    assert result.returncode == 0
    assert elapsed >= 0.5 + 20 / 40


@pytest.mark.parametrize("args", [
    [],
    cli_args()[:5],
    [*cli_args(), "extra"],
    cli_args(max_new="many"),  # type: ignore[arg-type]
    cli_args(max_new=0),
    ["qwen35/missing.json", *cli_args()[1:]],
    [cli_args()[0], "libQnnMissing.so", *cli_args()[2:]],
    cli_args(bundle="nowhere"),
])
def test_bad_command_lines_are_usage_errors(stage: Stage, args: list[str]) -> None:
    result = run_cli(stage(), args)
    assert result.returncode == 2
    assert result.stdout == b""
    assert b"usage: qhx_generate" in result.stderr


def test_missing_context_binary_is_a_usage_error(stage: Stage) -> None:
    sandbox = stage()
    (wq(sandbox) / "qwen35" / "qwen3508b_decode_f16.bin").unlink()
    result = run_cli(sandbox, cli_args(prompt="hi"))
    assert result.returncode == 2 and b"qwen3508b_decode_f16.bin" in result.stderr


def test_load_time_includes_the_real_tokenizer_load(stage: Stage) -> None:
    sandbox = stage(speed=1, load_s=5.0, stop_rate=0, precision="w8")
    session = RuntimeSession(sandbox, bundle="qwen35-w8")
    try:
        ready = session.recv(timeout=60)
        assert ready["precision"] == "w8"
        # honoured, not paid on top of the real load (1-3 s on a busy machine)
        assert 5000 <= ready["load_ms"] < 5000 + 800
        done = session.generate("w8", [1], 24)[-1]
        assert 24 / 24.2 * 1000 * 0.97 <= done["decode_ms"] <= 24 / 24.2 * 1000 * 1.1
    finally:
        session.kill()


def test_arch_mismatch_fails_the_load_in_both_modes(stage: Stage) -> None:
    sandbox = stage(soc="SM8750")
    oneshot = run_cli(sandbox, cli_args(prompt="hi"))
    assert oneshot.returncode == 1 and oneshot.stdout == b""
    assert b"SM8750" in oneshot.stderr and b"SM8850" in oneshot.stderr
    session = run_cli(sandbox, cli_args())
    assert session.returncode != 0
    lines = session.stdout.splitlines()
    assert len(lines) == 1
    error = json.loads(lines[0])
    assert (error["ev"], error["id"], error["code"]) == ("error", None, "runtime")


def test_without_props_the_phone_counts_as_sm8850(stage: Stage) -> None:
    sandbox = stage()
    (sandbox / "props.json").unlink()
    assert run_cli(sandbox, cli_args(max_new=3, prompt="hi")).returncode == 0


def test_crash_after_knob_kills_the_process_mid_request(stage: Stage) -> None:
    sandbox = stage(crash_after=3, stop_rate=0)
    session = RuntimeSession(sandbox)
    try:
        assert session.recv()["ev"] == "ready"
        session.send(op="generate", id="boom", prompt_ids=[1], max_new=50)
        events = []
        while (line := session.recv_raw()[1]) is not None:
            events.append(json.loads(line))
        assert [e["ev"] for e in events] == ["start", "tok", "tok", "tok"]
        assert session.wait() == 134
    finally:
        session.kill()


def test_no_session_knob_takes_dash_as_the_prompt(stage: Stage) -> None:
    sandbox = stage(no_session=True)
    result = run_cli(sandbox, cli_args(max_new=10))
    assert result.returncode == 0
    assert result.stdout and not result.stdout.startswith(b"{")
    assert STATS in result.stderr


def test_model_card_line_through_adb(sim_lab: SimLab) -> None:
    phone = sim_lab.add_phone(sim_config={"speed": 0})
    try:
        result = sim_lab.adb("-s", phone.serial, "shell", MODEL_CARD_LINE.format(root="/data/local/tmp/wq"),
                             timeout=60)
    finally:
        sim_lab.remove_phone(phone.serial)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
