"""SimLab / SimPhone as colleagues and the CLI use them, and the `sim` CLI itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import adbutils
import pytest

from server.sim.adbd import EMULATOR_PORTS
from server.sim.harness import SimLab, free_port


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def adb_server_pid(port: int) -> int:
    """pid of the `adb -P <port> server nodaemon` process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"nodaemon" in argv and str(port).encode() in argv and process_alive(int(entry)):
                return int(entry)
    raise LookupError(f"no adb server on port {port}")


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_lab_starts_phones_and_stop_leaves_no_stray_process() -> None:
    lab = SimLab(phones=2, speed=0).start()
    try:
        listed = adbutils.AdbClient(port=lab.adb_port).list()
        assert sorted(d.serial for d in listed if d.state == "device") == sorted(p.serial for p in lab.phones)
        assert lab.adb_server == f"127.0.0.1:{lab.adb_port}"
        assert all(p.port not in EMULATOR_PORTS for p in lab.phones)
        server_pid = adb_server_pid(lab.adb_port)
        device = adbutils.AdbClient(port=lab.adb_port).device(lab.phones[0].serial)
        stream = device.shell("echo $$; exec sleep 300", stream=True)
        with stream.conn.makefile("rb") as out:
            sleeper = int(out.readline())
        assert process_alive(sleeper)
        workdir = lab.workdir
    finally:
        lab.stop()
    lab.stop()  # idempotent
    stream.close()
    assert not process_alive(sleeper)
    assert not process_alive(server_pid)
    assert not any(listening(p) for p in (lab.adb_port, *(phone.port for phone in lab.phones)))
    assert not workdir.exists()


def test_added_phone_has_its_soc_and_removed_phone_disconnects(sim_lab: SimLab) -> None:
    phone = sim_lab.add_phone(soc="SM8750", env={"QHX_TEST_VAR": "set"})
    try:
        device = adbutils.AdbClient(port=sim_lab.adb_port).device(phone.serial)
        assert device.shell("getprop ro.soc.model; getprop ro.board.platform; echo $QHX_TEST_VAR") == (
            "SM8750\nsun\nset")
        phone.env["QHX_LATER"] = "later"  # extra env applies to commands started afterwards
        assert device.shell("echo $QHX_LATER $QHX_SIM_SANDBOX") == f"later {phone.sandbox}"
        assert phone.phone_path("/data/local/tmp/wq").is_dir()  # staged
    finally:
        sim_lab.remove_phone(phone.serial)
    assert phone.serial not in sim_lab.adb("devices").stdout
    assert phone not in sim_lab.phones
    assert not listening(phone.port)


def test_configure_merges_knobs_into_sim_json(sim_lab: SimLab) -> None:
    phone = sim_lab.phones[0]
    before = json.loads((phone.sandbox / "sim.json").read_text())
    try:
        phone.configure(speed=0)
        phone.configure(hang=True)
        knobs = json.loads((phone.sandbox / "sim.json").read_text())
        assert (knobs["speed"], knobs["hang"]) == (0, True)
        with pytest.raises(KeyError):
            phone.configure(no_such_knob=1)
    finally:
        phone.configure(**before)


def test_phone_path_maps_into_the_sandbox_and_refuses_escapes(sim_lab: SimLab) -> None:
    phone = sim_lab.phones[0]
    assert phone.phone_path("/data/local/tmp/x") == phone.sandbox / "data/local/tmp/x"
    assert phone.phone_path("/sdcard/y") == phone.sandbox / "sdcard/y"
    with pytest.raises(ValueError):
        phone.phone_path("/data/../../outside")


def test_env_points_child_processes_at_the_lab(sim_lab: SimLab) -> None:
    code = "import adbutils; print(' '.join(d.serial for d in adbutils.adb.device_list()))"
    result = subprocess.run([sys.executable, "-c", code], env=sim_lab.env(), capture_output=True, text=True,
                            timeout=30, check=True)
    assert set(result.stdout.split()) == {p.serial for p in sim_lab.phones}


def test_free_port_avoids_adb_ports() -> None:
    ports = {free_port() for _ in range(20)}
    assert not ports & {5037, *EMULATOR_PORTS}


def _two_free_ports() -> int:
    while True:
        port = free_port()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port + 1)) != 0 and port + 1 not in EMULATOR_PORTS:
                return port


def test_cli_serves_phones_on_consecutive_ports_until_interrupted(tmp_path: Path) -> None:
    code = "import sys; from server.sim.cli import main; sys.exit(main(sys.argv[1:]))"
    for attempt in range(3):
        # a port found free may be taken before the CLI binds it (another test worker's connection): the
        # CLI then says so and exits; that is the test's race, not the CLI's, so try other ports
        port = _two_free_ports()
        argv = ["--phones", "2", "--listen", f"127.0.0.1:{port}", "--adb", "--speed", "0", "--checkpoints", "2",
                "--workdir", str(tmp_path / f"lab{attempt}"), "--log-level", "warning"]
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stderr is not None
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C"):
                break
        if lines or proc.wait(timeout=20) == 0:
            break
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
        assert "in use" in err, err  # any other early exit is a failure of the CLI
    lab = tmp_path / f"lab{attempt}"
    try:
        assert f"adb connect 127.0.0.1:{port}" in lines, lines
        assert f"adb connect 127.0.0.1:{port + 1}" in lines
        adb_port = int(next(line for line in lines if "ANDROID_ADB_SERVER_PORT=" in line)
                       .split("ANDROID_ADB_SERVER_PORT=")[1].split(";")[0])
        states = {d.serial: d.state for d in adbutils.AdbClient(port=adb_port).list()}
        assert states == {f"127.0.0.1:{port}": "device", f"127.0.0.1:{port + 1}": "device"}
        for n in (1, 2):  # the slot count reached each phone's knobs (read by its sessions)
            assert json.loads((lab / f"phone{n}" / "sim.json").read_text())["checkpoints"] == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    deadline = time.monotonic() + 2
    while listening(adb_port) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(listening(p) for p in (adb_port, port, port + 1))


def test_cli_refuses_non_loopback_listen_addresses(capsys: pytest.CaptureFixture[str]) -> None:
    from server.sim.cli import main

    with pytest.raises(SystemExit):
        main(["--listen", "0.0.0.0:6101"])
    assert "loopback only" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_cli_refuses_a_bad_checkpoint_count(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    from server.sim.cli import main

    with pytest.raises(SystemExit):
        main(["--checkpoints", value])
    assert "--checkpoints" in capsys.readouterr().err


@pytest.mark.parametrize(("checkpoints", "slots"), [(None, 4), (0, 0), (7, 7)])
def test_lab_sets_the_phones_checkpoint_slots(tmp_path: Path, checkpoints: int | None, slots: int) -> None:
    with SimLab(phones=1, speed=0, workdir=tmp_path, private_adb=False, checkpoints=checkpoints) as lab:
        assert json.loads((lab.phones[0].sandbox / "sim.json").read_text())["checkpoints"] == slots


def test_cli_says_a_taken_listen_port_is_in_use_without_a_traceback(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = "import sys; from server.sim.cli import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run([sys.executable, "-c", code, "--phones", "1", "--listen", f"127.0.0.1:{port}",
                               "--speed", "0", "--workdir", str(tmp_path / "lab")],
                              check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "address already in use" in done.stderr and "Traceback" not in done.stderr, done.stderr
