"""SimLab's own faults with the real adb server: its adb server killed (the watchdog starts it again on
the same port and reconnects the phones), phones unplugged and plugged in again with their serial."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import adbutils
import pytest

from server.sim.harness import LabAdbClient, SimLab
from tests.sim.test_harness import adb_server_pid, listening, process_alive


@pytest.fixture(scope="module")
def lab() -> Iterator[SimLab]:
    with SimLab(phones=2, speed=0) as lab:
        yield lab


def listed(lab: SimLab) -> dict[str, str]:
    return {d.serial: d.state for d in LabAdbClient(lab.adb_port).list()}  # (adbutils' own may start a server)


def wait_until(what: str, predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (adbutils.AdbError, OSError):
            pass  # the adb server is down for a moment
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def test_a_killed_adb_server_is_started_again_on_its_port_with_every_phone(lab: SimLab) -> None:
    port, restarts = lab.adb_port, lab.adb_restarts
    pid = lab.kill_adb_server()
    assert not process_alive(pid)
    wait_until("adb server restarted", lambda: lab.adb_restarts == restarts + 1)
    assert lab.adb_port == port and adb_server_pid(port) != pid
    want = {p.serial: "device" for p in lab.phones}
    wait_until("phones listed again", lambda: listed(lab) == want)


def test_restart_adb_server_replaces_a_running_one_once(lab: SimLab) -> None:
    restarts = lab.adb_restarts
    pid = adb_server_pid(lab.adb_port)
    lab.restart_adb_server()
    time.sleep(0.5)  # the watchdog saw the old server die: it must not start yet another one
    assert lab.adb_restarts == restarts + 1
    assert not process_alive(pid) and process_alive(adb_server_pid(lab.adb_port))
    wait_until("phones listed again", lambda: listed(lab) == {p.serial: "device" for p in lab.phones})


def test_an_unplugged_phone_leaves_the_list_and_comes_back_with_its_serial(lab: SimLab) -> None:
    phone = lab.phones[0]
    serial, sandbox = phone.serial, phone.sandbox
    lab.unplug(serial)
    assert serial not in listed(lab) and not phone.started
    lab.replug(serial)
    assert phone.serial == serial and phone.sandbox == sandbox
    assert listed(lab)[serial] == "device"
    out = LabAdbClient(lab.adb_port).device(serial).shell("echo plugged")
    assert out.strip() == "plugged"


def test_a_lab_without_supervision_leaves_its_dead_adb_server_dead() -> None:
    with SimLab(phones=1, speed=0, supervise_adb=False) as lab:
        lab.kill_adb_server()
        time.sleep(0.5)
        assert lab.adb_restarts == 0
        with pytest.raises(LookupError):
            adb_server_pid(lab.adb_port)
        lab.restart_adb_server()
        wait_until("phone listed", lambda: listed(lab) == {lab.phones[0].serial: "device"})


def test_stop_does_not_let_the_watchdog_start_the_adb_server_again() -> None:
    lab = SimLab(phones=1, speed=0).start()
    port = lab.adb_port
    lab.stop()
    time.sleep(0.3)
    with pytest.raises(LookupError):
        adb_server_pid(port)
    assert lab.adb_restarts == 0


def adb_servers_on(port: int) -> list[int]:
    """Every adb server process serving ``port``: the lab's (``-P <port> server nodaemon``) and any
    other (an adb client's auto-started ``-L tcp:<port> fork-server server``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            spec = {str(port).encode(), f"tcp:{port}".encode()}
            if Path(argv[0].decode(errors="replace")).name == "adb" and b"server" in argv and spec & set(argv) \
                    and process_alive(int(entry)):
                found.append(int(entry))
    return found


def stray_adb_servers() -> list[int]:
    """adb servers that an adb client started on its own (``fork-server``) from this test run, on any
    port (adbutils' client runs ``adb start-server``, on 5037 by default, when connecting fails)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if b"fork-server" in argv and b"PYTEST_CURRENT_TEST=tests/sim/test_harness_faults.py" in environ \
                    and process_alive(int(entry)):
                found.append(int(entry))
    return found


def test_the_labs_adb_commands_never_start_an_adb_server_of_their_own() -> None:
    # Told the port with -P (or ANDROID_ADB_SERVER_PORT), the adb CLI starts a server of its own, a
    # daemon outside the lab, when none answers. The watchdog's `adb connect` right after a restart, the
    # server killed again meanwhile, did that: the lab's next server could not bind the port and died at
    # once (abort), again and again, while the stray one served.
    with SimLab(phones=1, speed=0, supervise_adb=False) as lab:
        lab.kill_adb_server()
        lab.adb("connect", lab.phones[0].serial)  # what the watchdog runs after a restart
        subprocess.run([lab.adb_binary, "devices"], env=lab.env(), capture_output=True, timeout=20,
                       check=False)  # a child given the lab's environment
        assert not listening(lab.adb_port), adb_servers_on(lab.adb_port)


def test_an_adb_server_someone_else_started_on_the_labs_port_gives_way() -> None:
    with SimLab(phones=1, speed=0, supervise_adb=False) as lab:
        lab.kill_adb_server()
        env = {k: v for k, v in lab.env().items() if k != "ADB_SERVER_SOCKET"}
        subprocess.run([lab.adb_binary, "-P", str(lab.adb_port), "start-server"], env=env, capture_output=True,
                       timeout=20, check=True)  # a user's adb, pointed at the lab's port
        lab.restart_adb_server()
        time.sleep(0.5)  # the lab's server died at once when the port was taken
        assert adb_servers_on(lab.adb_port) == [adb_server_pid(lab.adb_port)]
        wait_until("phone listed", lambda: listed(lab) == {lab.phones[0].serial: "device"})


def test_a_burst_of_adb_server_kills_ends_with_the_labs_own_server_and_every_phone(lab: SimLab) -> None:
    for _ in range(12):
        with contextlib.suppress(RuntimeError):
            lab.kill_adb_server()
        time.sleep(0.25)
    want = {p.serial: "device" for p in lab.phones}
    wait_until("phones listed again", lambda: listed(lab) == want, timeout=30)
    time.sleep(0.5)
    assert adb_servers_on(lab.adb_port) == [adb_server_pid(lab.adb_port)]
    assert lab._adb_proc is not None and lab._adb_proc.poll() is None
    assert not stray_adb_servers()
