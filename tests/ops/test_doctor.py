"""`qhx-server doctor` against simulated phones behind the real adb server, healthy and broken one way
each (no mocks: the adb states come from the simulated adbd's handshake, the load failures from the
simulated runtime).

One lab for the module: the broken phones are checked together in one `doctor --all --quick` run (as
an operator would check a bench), and each test reads its phone from that report; the few runs that
need their own options get their own phone.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from server import cli
from server.backends.adb.discovery import Bundle
from server.backends.adb.launcher import Launcher
from server.backends.adb.session import Session
from server.backends.adb.transport import AdbServerClient
from server.ops.doctor.cli import main
from server.ops.doctor.context import Options
from server.ops.doctor.runner import Target, check_phone
from server.ops.doctor.runner import doctor as run_doctor
from server.ops.progress import Steps
from server.settings import Settings
from server.sim.harness import SimLab, SimPhone

DOCS = Path(__file__).resolve().parents[2] / "docs" / "doctor.md"
ROOT = "/data/local/tmp/wq"
CHECKS = ["adb", "staging", "arch", "oneshot", "session", "determinism", "health"]
# generous for a loaded 2-core machine (a simulated load includes the real tokenizer load), short
# enough that the hang-at-load phone costs seconds, not minutes
TIMEOUTS = ["--ready-timeout-s", "10", "--stall-timeout-s", "8", "--adb-timeout-s", "10"]


def schema() -> dict[str, Any]:
    text = DOCS.read_text()
    block = re.search(r"## JSON schema.*?```json\n(.*?)\n```", text, re.DOTALL)
    assert block, "docs/doctor.md has no JSON schema block"
    loaded: dict[str, Any] = json.loads(block.group(1))
    return loaded


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.out)
        jsonschema.Draft202012Validator(schema()).validate(data)
        return data

    def phone(self, serial: str) -> dict[str, Any]:
        [phone] = [p for p in self.json["phones"] if p["serial"] == serial]
        return phone

    def check(self, serial: str, name: str) -> dict[str, Any]:
        [check] = [c for c in self.phone(serial)["checks"] if c["name"] == name]
        return check


def doctor(lab: SimLab, *args: str, cache: Path) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--adb-server", lab.adb_server, "--tokenizer-cache", str(cache), *TIMEOUTS, *args], out=out, err=err)
    return Run(code, out.getvalue(), err.getvalue())


def statuses(run: Run, serial: str) -> dict[str, str]:
    return {c["name"]: c["status"] for c in run.phone(serial)["checks"]}


def assert_actionable(run: Run) -> None:
    """The class of defect: a warn or fail without the exact next command (every report, every check)."""
    for phone in run.json["phones"]:
        for check in phone["checks"]:
            if check["status"] in ("warn", "fail"):
                assert check["advice"] and check["command"], check
            if check["status"] == "skip":
                assert check["summary"], check


@pytest.fixture(scope="module")
def lab() -> Iterator[SimLab]:
    with SimLab(phones=0, speed=0) as lab:
        yield lab


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


def on_phone(sim: SimPhone, rel: str) -> Path:
    return sim.phone_path(f"{ROOT}/{rel}")


@pytest.fixture(scope="module")
def bench(lab: SimLab, cache: Path) -> Iterator[tuple[dict[str, SimPhone], Run]]:
    """A bench of phones, each broken one way, checked in one `doctor --all --quick --json` run."""
    phones = {
        "healthy": lab.add_phone(),
        "wrong_soc": lab.add_phone(soc="SM8650"),
        "missing_skel": lab.add_phone(),
        "missing_binary": lab.add_phone(),
        "not_executable": lab.add_phone(),
        "truncated": lab.add_phone(),
        "no_session": lab.add_phone(sim_config={"no_session": True}),
        "hang_at_load": lab.add_phone(sim_config={"load_s": 86400, "speed": 1}),
        "slow": lab.add_phone(sim_config={"speed": 0.5, "load_s": 0.2}),
        "unauthorized": lab.add_phone(),
        "offline": lab.add_phone(),
    }
    on_phone(phones["missing_skel"], "libQnnHtpV81Skel.so").unlink()
    on_phone(phones["missing_binary"], "qhx_generate").unlink()
    on_phone(phones["not_executable"], "qhx_generate").chmod(0o644)
    binary = on_phone(phones["truncated"], "qwen35/qwen3508b_decode_f16.bin")
    binary.write_bytes(binary.read_bytes()[:1000])
    for state in ("unauthorized", "offline"):
        phones[state].set_adb_state(state)
        lab.wait_for_devices([phones[state].serial], state=state)
    # all at once: the hang-at-load phone's wait overlaps the others' work
    run = doctor(lab, "--all", "--quick", "--json", "--parallel", str(len(phones)), cache=cache)
    yield phones, run
    for sim in phones.values():
        lab.remove_phone(sim.serial)


def test_bench_report_is_valid_json_and_fails_because_some_phones_fail(
        bench: tuple[dict[str, SimPhone], Run]) -> None:
    phones, run = bench
    report = run.json
    assert run.code == report["exit_code"] == 1 and report["ok"] is False
    assert {p["serial"] for p in report["phones"]} == {sim.serial for sim in phones.values()}
    for phone in report["phones"]:
        assert [c["name"] for c in phone["checks"]] == CHECKS
    versions = report["versions"]
    assert versions["qhx_server"] and versions["python"].count(".") == 2 and versions["adbutils"]
    assert list(versions["adb"].values()) == [41] or all(isinstance(v, int) for v in versions["adb"].values())
    assert_actionable(run)


def test_healthy_phone_passes_every_check_but_health_which_quick_skips(
        bench: tuple[dict[str, SimPhone], Run]) -> None:
    phones, run = bench
    serial = phones["healthy"].serial
    assert statuses(run, serial) == {**dict.fromkeys(CHECKS[:-1], "pass"), "health": "skip"}
    phone = run.phone(serial)
    assert (phone["android"], phone["sdk"], phone["soc"], phone["arch"]) == ("16", "36", "SM8850", "v81")
    assert phone["model"] == "QHX-Sim-SM8850" and phone["simulated"] is True and phone["bundle"] == "qwen35"
    assert run.check(serial, "health")["summary"] == "not run: --quick"
    assert run.check(serial, "determinism")["data"]["agree"] is True
    session = run.check(serial, "session")["data"]
    assert session["proto"] == 1 and session["checkpoints"] == 4 and session["ping_ms"] >= 0


@pytest.mark.parametrize(("phone", "check", "said", "command"), [
    ("wrong_soc", "arch", "cannot run on SM8650 (Hexagon v75)", "qhx-server devices"),
    ("missing_skel", "staging", "libQnnHtpV81Skel.so missing from /data/local/tmp/wq",
     "push \"$QAIRT_SDK_ROOT/lib/hexagon-v81/unsigned/libQnnHtpV81Skel.so\" /data/local/tmp/wq/"),
    ("missing_binary", "staging", "qhx_generate is missing from /data/local/tmp/wq",
     "push qhx_generate /data/local/tmp/wq/"),
    ("not_executable", "staging", "/data/local/tmp/wq/qhx_generate is not executable",
     "shell 'chmod 755 /data/local/tmp/wq/qhx_generate'"),
    ("truncated", "oneshot", "truncated context binary", "qhx-server provision --bundle v81 --serial"),
    ("hang_at_load", "oneshot", "no output for 18 s (hang at load?); the process was killed",
     "shell \"cd /data/local/tmp/wq && LD_LIBRARY_PATH=. ./qhx_generate"),
])
def test_broken_phone_fails_its_check_says_what_to_run_and_skips_what_follows(
        lab: SimLab, bench: tuple[dict[str, SimPhone], Run], phone: str, check: str, said: str, command: str) -> None:
    phones, run = bench
    serial = phones[phone].serial
    result = run.check(serial, check)
    assert result["status"] == "fail", result
    assert said in result["summary"] and command in result["command"], result
    assert result["advice"]
    if "-s " in result["command"]:  # adb commands name this phone and this lab's adb server
        assert f"adb -P {lab.adb_port} -s {serial}" in result["command"]
    later = CHECKS[CHECKS.index(check) + 1:]
    skipped = [c for c in later if c != "arch"]  # arch still runs after a staging failure
    assert all(statuses(run, serial)[c] == "skip" for c in skipped), statuses(run, serial)
    assert run.phone(serial)["ok"] is False


def test_wrong_soc_quotes_the_model_card_and_skips_the_runs(bench: tuple[dict[str, SimPhone], Run]) -> None:
    phones, run = bench
    serial = phones["wrong_soc"].serial
    assert statuses(run, serial)["staging"] == "pass"  # the v81 skel is there: only the arch is wrong
    arch = run.check(serial, "arch")
    assert any("Arch-pinned: a v81 binary will not load on another Hexagon arch" in d for d in arch["details"])
    assert run.check(serial, "oneshot")["summary"] == "not run: arch failed"
    assert run.check(serial, "health")["summary"] == "not run: arch failed"  # the reason travels down


def test_missing_skel_names_the_arch_of_the_bundle(bench: tuple[dict[str, SimPhone], Run]) -> None:
    phones, run = bench
    result = run.check(phones["missing_skel"].serial, "staging")
    assert "Hexagon v81 skel/stub come from the QAIRT SDK" in result["advice"]
    assert "libQnnHtpV81Stub.so" not in result["summary"]


def test_truncated_binary_fails_the_run_with_the_runtime_s_stderr(bench: tuple[dict[str, SimPhone], Run]) -> None:
    phones, run = bench
    serial = phones["truncated"].serial
    assert statuses(run, serial)["staging"] == "pass"  # simulated placeholders: no card sizes to compare
    oneshot = run.check(serial, "oneshot")
    assert oneshot["data"]["exit_code"] == 1
    assert any("qwen3508b_decode_f16.bin" in d and d.startswith("stderr:") for d in oneshot["details"])


def test_no_session_support_is_a_warning_and_determinism_uses_two_one_shot_runs(
        bench: tuple[dict[str, SimPhone], Run]) -> None:
    phones, run = bench
    serial = phones["no_session"].serial
    session = run.check(serial, "session")
    assert session["status"] == "warn"
    assert session["summary"].startswith("one-shot only (each request reloads the model)")
    assert session["command"] == "qhx-server serve --device-mode oneshot"
    determinism = run.check(serial, "determinism")
    assert determinism["status"] == "pass" and "same output twice (one-shot" in determinism["summary"]
    assert run.phone(serial)["ok"] is True


def test_slow_decode_warns_against_the_card_rate(bench: tuple[dict[str, SimPhone], Run]) -> None:
    phones, run = bench
    serial = phones["slow"].serial
    oneshot = run.check(serial, "oneshot")
    assert oneshot["status"] == "warn", oneshot
    assert 0 < oneshot["data"]["tps"] < 0.8 * 22.7 and oneshot["data"]["card_tps"] == 22.7
    assert "of the card's 22.7" in oneshot["summary"] and "dumpsys thermalservice" in oneshot["command"]
    assert statuses(run, serial)["session"] == "pass" and run.phone(serial)["ok"] is True


@pytest.mark.parametrize(("state", "fix"), [
    ("unauthorized", "accept 'Allow USB debugging?'"),
    ("offline", "the phone's adbd does not answer"),
])
def test_unauthorized_and_offline_phones_fail_at_adb_with_the_fix(
        bench: tuple[dict[str, SimPhone], Run], state: str, fix: str) -> None:
    phones, run = bench
    serial = phones[state].serial
    adb = run.check(serial, "adb")
    assert adb["status"] == "fail" and adb["summary"] == f"adb state is '{state}', not 'device'"
    assert fix in adb["advice"] and adb["command"].endswith("reconnect offline")
    assert all(s == "skip" for s in list(statuses(run, serial).values())[1:])
    assert run.phone(serial)["adb_state"] == state


class Recorder(Steps):
    """What a progress display is told: each phone's steps (text, total), advances and verdict."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str, float | None]] = []
        self.advanced: dict[str, float] = {}
        self.done_lines: list[str] = []

    def step(self, serial: str, text: str, total: float | None = None) -> None:
        self.steps.append((serial, text, total))

    def advance_step(self, serial: str, amount: float) -> None:
        self.advanced[serial] = self.advanced.get(serial, 0.0) + amount

    def done(self, serial: str, summary: str) -> None:
        self.done_lines.append(summary)


async def test_healthy_phone_full_run_with_progress_and_the_sustained_decode_rate(lab: SimLab, cache: Path) -> None:
    sim = lab.add_phone(sim_config={"speed": 2, "load_s": 0.2})
    try:
        settings = Settings(adb_servers=[lab.adb_server], tokenizer_cache=str(cache), ready_timeout_s=10,
                            stall_timeout_s=8, state_reuse="off")
        progress = Recorder()
        report = await run_doctor(settings, Options(serials=(sim.serial,), health_s=1.0), progress)
        text = report.render()
        assert report.exit_code == 0, text
        lines = text.splitlines()
        for check in CHECKS:
            assert any(re.match(rf"  pass  {check} +\S", line) for line in lines), (check, text)
        health = next(line for line in lines if line.startswith("  pass  health"))
        assert "sustained" in health and "over 1 s" in health
        telemetry = report.phones[0].checks[-1].data["telemetry"]  # the simulated phone's dumpsys
        assert telemetry["skipped"] is None and telemetry["after"]["thermal_status"] == "NONE"
        assert telemetry["before"]["battery_pct"] is not None and "thermal NONE" in health
        assert f"{sim.serial}: ok (7 pass, 0 warn, 0 fail, 0 skip)" in text and "exit status 0" in lines[-1]
        # progress: every check announced in order, a bar for the sustained run, a verdict at the end
        names = [t for s, t, _ in progress.steps if s == sim.serial and t in CHECKS]
        assert names == CHECKS
        assert (sim.serial, "health: decoding for 1 s", 1.0) in progress.steps
        assert 0 < progress.advanced[sim.serial] <= 1.0
        assert progress.done_lines == [report.phones[0].verdict()]
    finally:
        lab.remove_phone(sim.serial)


def test_a_hot_phone_on_a_low_battery_warns_in_health_with_what_to_do(lab: SimLab, cache: Path) -> None:
    sim = lab.add_phone()  # speed 0: the simulated body stays as set
    try:
        sim.configure(charging=False, temp_c=45.0, battery_pct=12.0)
        run = doctor(lab, "--serial", sim.serial, "--health-seconds", "0.5", "--json", cache=cache)
        health = run.check(sim.serial, "health")
        assert health["status"] == "warn" and run.code == 0, health
        assert health["summary"].startswith("thermal status SEVERE: the phone throttles")
        assert "thermal SEVERE, 45.0 C, battery 12%, not charging" in health["summary"]
        assert health["command"].endswith("shell 'dumpsys thermalservice | head -n 3'")
        assert "also: battery 12% and not charging" in health["details"]
        assert health["data"]["telemetry"]["before"]["thermal_level"] == 3
    finally:
        lab.remove_phone(sim.serial)


class Unplug(Recorder):
    """Pulls the phone out as the session check starts."""

    def __init__(self, sim: SimPhone) -> None:
        super().__init__()
        self.sim = sim

    def step(self, serial: str, text: str, total: float | None = None) -> None:
        super().step(serial, text, total)
        if text == "session":
            self.sim.stop()


async def test_a_phone_unplugged_during_a_check_fails_it_as_gone_not_as_a_runtime_fault(
        lab: SimLab, cache: Path) -> None:
    sim = lab.add_phone()
    try:
        settings = Settings(adb_servers=[lab.adb_server], tokenizer_cache=str(cache), ready_timeout_s=10,
                            stall_timeout_s=8, adb_timeout_s=5, state_reuse="off")
        report = await run_doctor(settings, Options(serials=(sim.serial,), quick=True), Unplug(sim))
        [phone] = report.phones
        session = phone.checks[CHECKS.index("session")]
        assert session.status.value == "fail", session
        state = session.data["adb_state"]  # the adb server retries a TCP phone: offline, or gone
        if state == "not listed":
            assert session.summary.startswith("the phone went away during this check (adb no longer lists it)")
            assert session.command == f"adb -P {lab.adb_port} connect {sim.serial}"
        else:
            assert session.summary.startswith(f"the phone stopped answering during this check (adb now lists it: {state})")
            assert session.command == f"adb -P {lab.adb_port} reconnect offline"
        assert [c.status.value for c in phone.checks[-2:]] == ["skip", "skip"]
    finally:
        lab.remove_phone(sim.serial)


def test_a_bundle_name_the_phone_lacks_and_a_custom_launch_command_get_their_own_advice(
        lab: SimLab, cache: Path) -> None:
    sim = lab.add_phone(precision="both")
    try:
        typo = doctor(lab, "--serial", sim.serial, "--bundle", "qwen35-w9", "--quick", "--json", cache=cache)
        staging = typo.check(sim.serial, "staging")
        assert "bundle 'qwen35-w9' is not on the phone (found: qwen35, qwen35-w8)" in staging["summary"]
        assert staging["command"].startswith(f"qhx-server doctor --serial {sim.serial} --bundle qwen35 ")

        broken = "cd {root} && ./qhx_generate {manifest} x y {artifacts} {max_new} {prompt}"
        run = doctor(lab, "--serial", sim.serial, "--launch-command", broken, "--quick", "--json", cache=cache)
        oneshot = run.check(sim.serial, "oneshot")
        assert oneshot["status"] == "fail" and "launch command is not the model card's" in oneshot["advice"]
        assert any("./qhx_generate qwen35/qwen3.5-0.8b-1024.json x y qwen35 32" in d for d in oneshot["details"])
    finally:
        lab.remove_phone(sim.serial)


def test_local_copy_finds_a_truncated_file_by_size_and_a_changed_one_by_sha256(
        lab: SimLab, cache: Path, tmp_path: Path) -> None:
    sim = lab.add_phone()
    try:
        local = tmp_path / "v81"
        shutil.copytree(on_phone(sim, "qwen35"), local)
        clean = doctor(lab, "--serial", sim.serial, "--bundle", str(local), "--quick", "--json", cache=cache)
        assert clean.code == 0 and "matches the local copy" in clean.check(sim.serial, "staging")["summary"]

        lmhead = on_phone(sim, "qwen35/qwen3508b_lmhead_f16.bin")
        lmhead.write_bytes(lmhead.read_bytes()[:1000])
        embed = on_phone(sim, "qwen35/qwen3508b_embed_f16.bin")
        embed.write_bytes(b"x" * embed.stat().st_size)  # same size, other bytes
        run = doctor(lab, "--serial", sim.serial, "--bundle", str(local), "--quick", "--json", cache=cache)
        staging = run.check(sim.serial, "staging")
        assert run.code == 1 and staging["status"] == "fail"
        assert "qwen35/qwen3508b_lmhead_f16.bin: 1,000 bytes on the phone, 4,096 here" in staging["summary"]
        assert any("sha256 differs from the local copy: qwen35/qwen3508b_embed_f16.bin" in d
                   for d in staging["details"])
        assert staging["command"] == f"qhx-server provision --bundle {local} --serial {sim.serial} " \
                                     f"--adb-server {lab.adb_server}"
        assert statuses(run, sim.serial)["oneshot"] == "skip"
    finally:
        lab.remove_phone(sim.serial)


def test_half_pushed_bundle_and_leftover_part_files(lab: SimLab, cache: Path) -> None:
    sim = lab.add_phone()
    try:
        manifest = on_phone(sim, "qwen35/qwen3.5-0.8b-1024.json")
        manifest.rename(manifest.with_name(manifest.name + ".part"))  # as an interrupted provision leaves it
        run = doctor(lab, "--serial", sim.serial, "--quick", "--json", cache=cache)
        staging = run.check(sim.serial, "staging")
        assert staging["status"] == "fail" and "bundle qwen35 is half pushed" in staging["summary"]
        assert any("leftover .part file(s)" in d for d in staging["details"])
        assert staging["command"].startswith("qhx-server provision --bundle v81 --serial")
        assert run.check(sim.serial, "arch")["summary"] == "not run: no bundle manifest to read (see staging)"
    finally:
        lab.remove_phone(sim.serial)


def test_serial_not_listed_says_how_to_connect_it(lab: SimLab, cache: Path) -> None:
    run = doctor(lab, "--serial", "127.0.0.1:9", "--serial", "R5CX12ABC", "--json", cache=cache)
    assert run.code == 1
    tcp, usb = run.check("127.0.0.1:9", "adb"), run.check("R5CX12ABC", "adb")
    assert tcp["status"] == usb["status"] == "fail"
    assert tcp["command"].endswith("connect 127.0.0.1:9") and usb["command"].endswith("devices -l")
    assert_actionable(run)


def test_several_phones_need_serial_or_all(lab: SimLab, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    phones = [lab.add_phone(), lab.add_phone()]
    try:
        with pytest.raises(SystemExit) as exc:
            doctor(lab, cache=cache)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "choose with --serial S or check them all with --all" in err and phones[0].serial in err
    finally:
        for sim in phones:
            lab.remove_phone(sim.serial)


def test_no_adb_server_is_exit_1_with_the_command_to_start_one(cache: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    out = io.StringIO()
    code = main(["--adb-server", f"127.0.0.1:{dead}", "--adb-timeout-s", "2", "--json"], out=out, err=io.StringIO())
    data = json.loads(out.getvalue())
    jsonschema.Draft202012Validator(schema()).validate(data)
    assert code == 1 and data["phones"] == [] and data["problem"]["status"] == "fail"
    [server] = data["adb_servers"]
    assert server["reachable"] is False and server["command"] == f"adb -P {dead} start-server"


def test_doctor_is_a_qhx_server_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["doctor", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        cli.main(["doctor", "--parallel", "0"])
    assert exc.value.code == 2


class Act(Recorder):
    """Runs ``action`` as the check named ``at`` starts."""

    def __init__(self, at: str, action: Callable[[], object]) -> None:
        super().__init__()
        self.at, self.action = at, action

    def step(self, serial: str, text: str, total: float | None = None) -> None:
        super().step(serial, text, total)
        if text == self.at:
            self.action()


async def test_a_runtime_that_crashes_mid_check_is_the_runtime_s_fault_not_the_cable_s(lab: SimLab, cache: Path) -> None:
    # it was "the phone stopped answering during this check ... check the cable" while adb listed the phone
    sim = lab.add_phone()
    try:
        settings = Settings(adb_servers=[lab.adb_server], tokenizer_cache=str(cache), ready_timeout_s=10,
                            stall_timeout_s=8, state_reuse="off")
        report = await run_doctor(settings, Options(serials=(sim.serial,), quick=True),
                                  Act("session", lambda: sim.configure(crash_after=1)))
        session = report.phones[0].checks[CHECKS.index("session")]
        assert session.status.value == "fail" and "qhx_generate exited with code 134" in session.summary, session
        assert session.summary.startswith("failed while adb still lists the phone")
        assert "crashed, stalled or broke the protocol" in (session.advice or "")
        assert session.command is not None and session.command.startswith(f"adb -P {lab.adb_port} -s {sim.serial} shell")
        assert "./qhx_generate qwen35/qwen3.5-0.8b-1024.json" in session.command and session.command.endswith(' -"')
    finally:
        lab.remove_phone(sim.serial)


async def test_a_phone_gone_from_adb_and_a_dead_adb_server_each_get_their_own_fix(lab: SimLab) -> None:
    # both were "the phone stopped answering ... check the cable; adb devices -l"
    settings = Settings(adb_servers=[lab.adb_server], adb_timeout_s=5)
    gone = Target(AdbServerClient(lab.adb_server, timeout=5), "127.0.0.1:9", "device")  # listed, then not
    adb = (await check_phone(gone, settings, Options(quick=True), Steps())).checks[0]
    assert adb.status.value == "fail" and adb.summary.startswith("the phone went away during this check"), adb
    assert adb.command == f"adb -P {lab.adb_port} connect 127.0.0.1:9"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    stopped = Target(AdbServerClient(dead, timeout=5), "R5CX12ABC", "device")
    adb = (await check_phone(stopped, settings, Options(quick=True), Steps())).checks[0]
    assert adb.summary.startswith(f"the adb server {dead} stopped answering during this check"), adb
    assert adb.command == f"adb -P {dead.rsplit(':', 1)[1]} start-server" and "adb connect" in (adb.advice or "")


async def test_a_phone_in_use_is_reported_busy_and_left_alone(lab: SimLab, cache: Path) -> None:
    # doctor ran its one-shot, session and 20 s decode beside serve's session on the same NPU, and said
    # nothing; now staging says who runs there and the runs are not started
    sim = lab.add_phone()
    settings = Settings(adb_servers=[lab.adb_server], tokenizer_cache=str(cache), ready_timeout_s=10,
                        stall_timeout_s=8, state_reuse="off")
    client = AdbServerClient(lab.adb_server, timeout=10)
    bundle = Bundle("qwen35", "qwen3.5-0.8b-1024.json", "qwen3.5-0.8b", 1024, "fp16")
    command = Launcher(client, sim.serial, settings, name=sim.serial).command(bundle, "-", settings.session_max_new)
    serving = await Session.start(client, sim.serial, command, settings)  # what serve holds on the phone
    try:
        report = await run_doctor(settings, Options(serials=(sim.serial,), quick=True))
        [phone] = report.phones
        staging = phone.checks[CHECKS.index("staging")]
        assert staging.status.value == "warn", staging
        assert staging.summary.startswith("the phone is busy: qhx_generate already runs from /data/local/tmp/wq")
        pids = [b["pid"] for b in staging.data["busy"]]
        assert pids and "qhx_generate" in staging.data["busy"][0]["command"]
        assert staging.command == f"adb -P {lab.adb_port} -s {sim.serial} shell 'kill {' '.join(map(str, pids))}'"
        for name in ("oneshot", "session", "determinism"):
            check = phone.checks[CHECKS.index(name)]
            assert check.status.value == "skip" and "the phone is busy" in check.summary, check
        assert report.exit_code == 0  # the phone serves: a warning, not a failure
        assert serving.alive and await serving.ping() >= 0  # undisturbed
    finally:
        await serving.close()
        lab.remove_phone(sim.serial)


def test_ctrl_c_while_the_phone_hashes_stops_at_once_with_130_and_leaves_nothing_running(
        lab: SimLab, cache: Path, tmp_path: Path) -> None:
    # the phone's sha256sum ran in a worker thread: Ctrl-C waited for it (a minute or two for a real
    # bundle), then printed a traceback
    sim = lab.add_phone()
    started = tmp_path / "sha256sum.pid"
    slow = sim.phone_path("/system/bin/sha256sum")  # this phone's sha256sum takes its time
    slow.write_text(f"#!/bin/sh\necho $$ > {started}\nexec sleep 600\n")
    slow.chmod(0o755)
    local = tmp_path / "v81"
    shutil.copytree(on_phone(sim, "qwen35"), local)
    argv = ["doctor", "--adb-server", lab.adb_server, "--serial", sim.serial, "--bundle", str(local), "--quick",
            "--json", "--tokenizer-cache", str(cache), "--adb-timeout-s", "300"]
    # Ctrl-C raises KeyboardInterrupt in the child even when this test runs where SIGINT is ignored (nohup)
    child = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
            "from server.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", child, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for _ in range(1200):  # until the phone hashes (bounded: 120 s)
            if started.exists() and started.read_text().strip() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        pid = int(started.read_text())
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=90)  # not the 300 s the hashing may take
        assert proc.returncode == 130, err
        assert out == "" and "interrupted" in err and "Traceback" not in err, err
        for _ in range(100):  # the phone's process goes with the stream (bounded: 10 s)
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists(), "sha256sum still runs on the phone"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        lab.remove_phone(sim.serial)


async def test_a_phone_whose_debugging_is_revoked_mid_check_gets_the_unauthorized_fix(lab: SimLab) -> None:
    # adb lists it offline for a moment on the way to unauthorized: that was the advice it got
    sim = lab.add_phone()
    try:
        settings = Settings(adb_servers=[lab.adb_server], adb_timeout_s=5, state_reuse="off")
        report = await run_doctor(settings, Options(serials=(sim.serial,), quick=True),
                                  Act("oneshot", lambda: sim.set_adb_state("unauthorized")))
        oneshot = report.phones[0].checks[CHECKS.index("oneshot")]
        assert oneshot.status.value == "fail" and oneshot.data["adb_state"] == "unauthorized", oneshot
        assert "accept 'Allow USB debugging?'" in (oneshot.advice or "")
    finally:
        lab.remove_phone(sim.serial)
