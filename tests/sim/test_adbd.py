"""The simulated phone's adbd, driven by the real adb server through the adb CLI and adbutils."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import re
import socket
import statistics
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import adbutils
import pytest

from server.sim.harness import SimLab, SimPhone


@pytest.fixture(scope="module")
def phone(sim_lab: SimLab) -> SimPhone:
    return sim_lab.phones[0]


@pytest.fixture(scope="module")
def device(sim_lab: SimLab, phone: SimPhone) -> adbutils.AdbDevice:
    client = adbutils.AdbClient(host="127.0.0.1", port=sim_lab.adb_port, socket_timeout=10)
    return client.device(phone.serial)


@pytest.fixture
def spare_phone(sim_lab: SimLab) -> Iterator[SimPhone]:
    """A phone of its own for tests that break its link."""
    phone = sim_lab.add_phone()
    yield phone
    phone.refuse_connections(False)
    sim_lab.remove_phone(phone.serial)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def v2_packet(packet_id: int, data: bytes = b"") -> bytes:
    return struct.pack("<BI", packet_id, len(data)) + data


def read_v2_until_exit(conn: adbutils.AdbConnection) -> tuple[bytes, bytes, int]:
    out, err = bytearray(), bytearray()
    while True:
        packet_id, length = struct.unpack("<BI", conn.read_exact(5))
        data = conn.read_exact(length)
        if packet_id == 1:
            out += data
        elif packet_id == 2:
            err += data
        elif packet_id == 3:
            return bytes(out), bytes(err), data[0]


def wait_for_state(lab: SimLab, serial: str, accept: set[str | None], timeout: float = 15.0) -> str | None:
    client = adbutils.AdbClient(host="127.0.0.1", port=lab.adb_port, socket_timeout=5)
    deadline = time.monotonic() + timeout
    while True:
        state = {d.serial: d.state for d in client.list()}.get(serial)
        if state in accept or time.monotonic() > deadline:
            return state
        time.sleep(0.02)


# --- adb CLI ------------------------------------------------------------------------------------


def test_devices_lists_phones_with_their_model(sim_lab: SimLab, phone: SimPhone) -> None:
    listing = sim_lab.adb("devices", "-l").stdout
    line = next(line for line in listing.splitlines() if line.startswith(phone.serial))
    # adb shows the banner's ro.product.* fields, with '-' turned into '_'
    assert " device " in line
    assert "model:QHX_Sim_SM8850" in line
    assert f"product:{phone.props['ro.product.name']}" in line


def test_shell_echo(sim_lab: SimLab, phone: SimPhone) -> None:
    result = sim_lab.adb("-s", phone.serial, "shell", "echo hi")
    assert (result.returncode, result.stdout) == (0, "hi\n")


def test_shell_v2_exit_code_and_stderr_reach_the_cli(sim_lab: SimLab, phone: SimPhone) -> None:
    result = sim_lab.adb("-s", phone.serial, "shell", "echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")


def test_shell_stdin_from_cli_reaches_the_process(sim_lab: SimLab, phone: SimPhone) -> None:
    result = subprocess.run([sim_lab.adb_binary, "-P", str(sim_lab.adb_port), "-s", phone.serial, "shell",
                             "tr a-z A-Z"], check=False, input="hello\n", env=sim_lab.env(),
                            capture_output=True, text=True, timeout=20)
    assert (result.returncode, result.stdout) == (0, "HELLO\n")


def test_exec_out_is_binary_safe(sim_lab: SimLab, phone: SimPhone) -> None:
    result = subprocess.run([sim_lab.adb_binary, "-P", str(sim_lab.adb_port), "-s", phone.serial, "exec-out",
                             r"printf 'a\000b\r\nc'"], check=False, env=sim_lab.env(), capture_output=True,
                            timeout=20)
    assert result.stdout == b"a\0b\r\nc"


def test_push_then_pull_5mb_is_byte_identical(sim_lab: SimLab, phone: SimPhone, tmp_path: Path) -> None:
    payload = os.urandom(5 * 1024 * 1024)
    (tmp_path / "in.bin").write_bytes(payload)
    pushed = sim_lab.adb("-s", phone.serial, "push", str(tmp_path / "in.bin"), "/data/local/tmp/sub/r.bin")
    assert pushed.returncode == 0, pushed.stderr
    assert phone.phone_path("/data/local/tmp/sub/r.bin").read_bytes() == payload
    pulled = sim_lab.adb("-s", phone.serial, "pull", "/data/local/tmp/sub/r.bin", str(tmp_path / "out.bin"))
    assert pulled.returncode == 0, pulled.stderr
    assert (tmp_path / "out.bin").read_bytes() == payload


def test_pull_of_a_missing_file_fails(sim_lab: SimLab, phone: SimPhone, tmp_path: Path) -> None:
    result = sim_lab.adb("-s", phone.serial, "pull", "/data/local/tmp/missing", str(tmp_path / "x"))
    assert result.returncode != 0
    assert "does not exist" in result.stderr or "No such file" in result.stderr


def test_getprop_prints_props_json(sim_lab: SimLab, phone: SimPhone) -> None:
    everything = sim_lab.adb("-s", phone.serial, "shell", "getprop").stdout
    assert "[ro.soc.model]: [SM8850]" in everything
    assert "[ro.build.version.release]: [16]" in everything
    one = sim_lab.adb("-s", phone.serial, "shell", "getprop ro.board.platform; getprop no.such.prop").stdout
    assert one == "canoe\n\n"


# --- adbutils -----------------------------------------------------------------------------------


def test_adbutils_lists_the_phone_and_runs_shell(device: adbutils.AdbDevice, phone: SimPhone) -> None:
    client = device._client  # the same client that found the device
    assert phone.serial in [d.serial for d in client.device_list()]
    # shell (v1) merges stderr into stdout and has no exit code
    assert device.shell("echo a; echo b >&2") == "a\nb"
    assert device.prop.model == "QHX-Sim-SM8850"


def test_adbutils_stream_delivers_lines_as_printed(device: adbutils.AdbDevice) -> None:
    conn = device.shell("for i in 1 2 3 4 5 6 7 8; do echo $i; sleep 0.05; done", stream=True)
    arrivals = []
    with conn, conn.conn.makefile("rb") as lines:
        for _line in lines:
            arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == 8
    # printed 50 ms apart: they must not arrive in one lump at exit
    assert statistics.median(gaps) > 0.03
    assert arrivals[-1] - arrivals[0] > 0.25


def test_adbutils_shell2_v2_reports_exit_codes(device: adbutils.AdbDevice) -> None:
    result = device.shell2("echo out; echo err >&2; exit 42", v2=True)
    assert (result.returncode, result.stdout, result.stderr) == (42, "out\n", "err\n")
    assert device.shell2("true", v2=True).returncode == 0


def test_large_output_arrives_complete_and_in_order(device: adbutils.AdbDevice) -> None:
    result = device.shell2("seq 1 300000; seq 1 1000 >&2", v2=True)
    assert result.stdout == "".join(f"{i}\n" for i in range(1, 300001))
    assert result.stderr == "".join(f"{i}\n" for i in range(1, 1001))


def test_concurrent_streams_on_one_phone_stay_apart(device: adbutils.AdbDevice) -> None:
    def run(i: int) -> tuple[int, str]:
        result = device.shell2(f"sleep 0.0{i % 5}; echo {i}; exit {i}", v2=True)
        return result.returncode, result.stdout

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert list(pool.map(run, range(16))) == [(i, f"{i}\n") for i in range(16)]


@pytest.mark.parametrize(("sig", "code"), [("TERM", 143), ("KILL", 137)])
def test_process_killed_by_signal_exits_128_plus_signal(device: adbutils.AdbDevice, sig: str,
                                                        code: int) -> None:
    assert device.shell2(f"kill -{sig} $$", v2=True).returncode == code


def test_sync_push_stat_list_pull(device: adbutils.AdbDevice, phone: SimPhone, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    assert device.sync.push(payload, "/data/local/tmp/sync/a.bin", mode=0o640) == len(payload)
    info = device.sync.stat("/data/local/tmp/sync/a.bin")
    assert info.size == len(payload)
    assert info.mode & 0o777 == 0o640
    assert device.sync.stat("/data/local/tmp/sync/nope").mode == 0
    assert "a.bin" in [f.path for f in device.sync.list("/data/local/tmp/sync")]
    assert device.sync.read_bytes("/data/local/tmp/sync/a.bin") == payload
    assert phone.phone_path("/data/local/tmp/sync/a.bin").read_bytes() == payload
    device.sync.pull("/data/local/tmp/sync/a.bin", tmp_path / "a.bin")
    assert (tmp_path / "a.bin").read_bytes() == payload


def test_sync_cannot_escape_the_sandbox(device: adbutils.AdbDevice, phone: SimPhone) -> None:
    with pytest.raises(adbutils.AdbError):
        device.sync.push(b"x", "/../../escape.txt")
    assert not (phone.sandbox.parent / "escape.txt").exists()


def test_unknown_service_is_refused(device: adbutils.AdbDevice) -> None:
    with device.open_transport() as conn:
        conn.send_command("nosuchservice:at all")
        with pytest.raises(adbutils.AdbError):
            conn.check_okay()


# --- raw shell,v2 stream --------------------------------------------------------------------------


def test_v2_stdin_reaches_the_process_and_close_stdin_ends_it(device: adbutils.AdbDevice) -> None:
    with device.open_transport() as conn:
        conn.send_command("shell,v2,raw:read line; echo got:$line; cat; exit 7")
        conn.check_okay()
        # stdin arrives split across packets and WRTEs; then close-stdin (id 4) lets `cat` see EOF
        conn.send(v2_packet(0, b"hel"))
        conn.send(v2_packet(0, b"lo\nrest") + v2_packet(5, b"\0" * 16) + v2_packet(4))
        assert read_v2_until_exit(conn) == (b"got:hello\nrest", b"", 7)


@pytest.mark.parametrize("prefix", ["", "trap '' HUP; "], ids=["plain", "ignoring-sighup"])
def test_closing_the_stream_kills_the_process_group_within_100ms(device: adbutils.AdbDevice,
                                                                 prefix: str) -> None:
    conn = device.shell(prefix + "echo $$; sleep 30 & sleep 31", stream=True)
    with conn.conn.makefile("rb") as out:
        pgid = int(out.readline())
    deadline = time.monotonic() + 5  # sh printed its pid before it forked the sleeps: wait for them
    while len(group_members(pgid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.002)
    assert len(group_members(pgid)) == 3  # sh and both sleeps
    started = time.monotonic()
    conn.close()
    while group_members(pgid) and time.monotonic() - started < 2:
        time.sleep(0.002)
    elapsed = time.monotonic() - started
    assert group_members(pgid) == []
    assert elapsed < 0.1, f"phone processes lived {elapsed * 1000:.0f} ms after the stream closed"


def test_no_process_outlives_a_finished_command(device: adbutils.AdbDevice) -> None:
    pgid = int(device.shell("echo $$; sleep 30 >/dev/null 2>&1 &"))
    deadline = time.monotonic() + 1
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert group_members(pgid) == []


# --- sandbox ---------------------------------------------------------------------------------------


def test_phone_paths_map_into_the_sandbox(sim_lab: SimLab, phone: SimPhone,
                                          device: adbutils.AdbDevice) -> None:
    marker = f"marker-{os.getpid()}-{time.monotonic_ns()}"
    out = device.shell(f"cd /data/local/tmp && touch {marker} /sdcard/{marker} && pwd && echo $HOME")
    assert out.splitlines() == [str(phone.sandbox / "data/local/tmp"), str(phone.sandbox)]
    assert phone.phone_path(f"/data/local/tmp/{marker}").is_file()
    assert phone.phone_path(f"/sdcard/{marker}").is_file()
    assert not Path(f"/data/local/tmp/{marker}").exists()
    assert not Path(f"/sdcard/{marker}").exists()
    # only phone sandboxes and the adb server's own files are in the lab's folder
    others = {p.name for p in sim_lab.workdir.iterdir() if not re.fullmatch(r"phone\d+", p.name)}
    assert others <= {"home", "adb-server.log", "adb.log"}


def test_commands_only_rewrite_word_initial_phone_prefixes(phone: SimPhone,
                                                           device: adbutils.AdbDevice) -> None:
    out = device.shell("echo /data/x foo/data/x '/sdcard' /mnt/sdcard/y")
    assert out == f"{phone.sandbox}/data/x foo/data/x {phone.sandbox}/sdcard /mnt/sdcard/y"


# --- transport faults -----------------------------------------------------------------------------


def test_drop_connections_takes_the_phone_offline_and_it_comes_back(sim_lab: SimLab,
                                                                     spare_phone: SimPhone) -> None:
    spare_phone.drop_connections()
    assert wait_for_state(sim_lab, spare_phone.serial, {"offline", None}) in ("offline", None)
    # the adb server reconnects TCP phones by itself; `adb connect` covers the case it gave up
    if wait_for_state(sim_lab, spare_phone.serial, {"device"}, timeout=5) != "device":
        sim_lab.adb("connect", spare_phone.serial)
    assert wait_for_state(sim_lab, spare_phone.serial, {"device"}) == "device"
    client = adbutils.AdbClient(host="127.0.0.1", port=sim_lab.adb_port, socket_timeout=10)
    assert client.device(spare_phone.serial).shell("echo back") == "back"


def test_refused_connections_keep_the_phone_offline_until_allowed(sim_lab: SimLab,
                                                                  spare_phone: SimPhone) -> None:
    spare_phone.refuse_connections(True)
    with socket.create_connection(("127.0.0.1", spare_phone.port), timeout=2) as sock:
        assert sock.recv(1) == b""  # closed at once
    spare_phone.drop_connections()
    assert wait_for_state(sim_lab, spare_phone.serial, {"offline", None}) in ("offline", None)
    time.sleep(0.5)
    assert wait_for_state(sim_lab, spare_phone.serial, {"device"}, timeout=0.5) != "device"
    spare_phone.refuse_connections(False)
    if wait_for_state(sim_lab, spare_phone.serial, {"device"}, timeout=5) != "device":
        sim_lab.adb("connect", spare_phone.serial)
    assert wait_for_state(sim_lab, spare_phone.serial, {"device"}) == "device"


def test_dropped_link_kills_running_commands(sim_lab: SimLab, spare_phone: SimPhone) -> None:
    client = adbutils.AdbClient(host="127.0.0.1", port=sim_lab.adb_port, socket_timeout=10)
    conn = client.device(spare_phone.serial).shell("echo $$; exec sleep 30", stream=True)
    with conn, conn.conn.makefile("rb") as out:
        pgid = int(out.readline())
        spare_phone.drop_connections()
        deadline = time.monotonic() + 1
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert group_members(pgid) == []


async def test_a_link_ends_only_after_every_stream_it_started_has_cleaned_up() -> None:
    """A stream the host closed (CLSE) is cancelled and forgotten by the link, its clean-up (killing
    the command) still running; the link ending did not wait for it, so a lab stopping then closed
    its loop under it ("Task was destroyed but it is pending!", "Loop that handles pid N is closed"
    on a SIGTERM while phones were starting, the command killed only by the process's death)."""
    from server.sim.adbd import A_CLSE, A_CNXN, A_OPEN, MAX_PAYLOAD, AdbConnection, Stream

    cleaned = asyncio.Event()

    async def service(stream: Stream) -> None:
        try:
            await asyncio.sleep(100)
        except asyncio.CancelledError:
            await asyncio.sleep(0.2)  # the command's clean-up (SIGHUP, then SIGKILL, then reaping)
            cleaned.set()
            raise

    served = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await AdbConnection(reader, writer, banner="device::", resolve=lambda name: service).serve()
        served.set()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_packet(A_CNXN, 0x01000001, MAX_PAYLOAD, b"host::\0") + _packet(A_OPEN, 7, 0, b"shell:x\0"))
    await reader.readexactly(24 + len(b"device::"))  # CNXN
    await reader.readexactly(24)  # OKAY: the stream is open on the device as local id 1
    writer.write(_packet(A_CLSE, 7, 1))
    await asyncio.sleep(0.05)  # the device has the CLSE: the stream's clean-up runs
    writer.close()
    await writer.wait_closed()
    await asyncio.wait_for(served.wait(), 10)
    assert cleaned.is_set()  # the link ended after its stream's clean-up, not before
    server.close()
    await server.wait_closed()


def _packet(command: int, arg0: int, arg1: int, data: bytes = b"") -> bytes:
    """One adb packet as the host sends it (checksum 0: version 0x01000001 does not check it)."""
    return struct.pack("<6I", command, arg0, arg1, len(data), 0, command ^ 0xFFFFFFFF) + data


async def _open_stream(port: int, service: str, host_id: int = 1
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A raw adb link to ``port`` with one stream to ``service`` opened: (reader, writer, the stream's
    id on the phone), once its OKAY is read."""
    from server.sim import adbd

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_packet(adbd.A_CNXN, adbd.A_VERSION, adbd.MAX_PAYLOAD, b"host::\0"))
    writer.write(_packet(adbd.A_OPEN, host_id, 0, f"{service}\0".encode()))
    while True:  # CNXN, then the OKAY of the stream
        command, phone_id, *_rest, length, _check, _magic = adbd._HEADER.unpack(await reader.readexactly(24))
        await reader.readexactly(length)
        if command == adbd.A_OKAY:
            return reader, writer, phone_id


def test_a_stop_ends_even_when_a_service_outlives_its_closed_link(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # the fault soak once saw a phone's stop wait forever on a link whose command did not end; whatever
    # keeps a service alive after its link closed, the stop kills it after a grace and ends
    from server.sim import adbd
    from server.sim.sandbox import Sandbox

    cancels = []

    async def stubborn(stream: object) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancels.append("ignored")  # the link's close: ignored
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancels.append("killed")  # the stop's last resort
            raise

    monkeypatch.setattr(adbd, "resolve_service", lambda name, sandbox: stubborn)
    monkeypatch.setattr(adbd, "STOP_GRACE_S", 0.3)

    async def scenario() -> float:
        daemon = adbd.AdbDaemon(Sandbox(tmp_path, props={}))
        port = await daemon.start()
        _reader, writer, _id = await _open_stream(port, "shell:sleep 1000")
        t0 = time.monotonic()
        await asyncio.wait_for(daemon.stop(), 10)
        writer.close()
        return time.monotonic() - t0

    took = asyncio.run(scenario())
    assert cancels == ["ignored", "killed"]
    assert took < 5


def test_where_task_waits_names_the_innermost_coroutine() -> None:
    from server.sim.adbd import where_task_waits

    async def innermost() -> None:
        await asyncio.sleep(3600)

    async def outer() -> None:
        await innermost()

    async def scenario() -> str:
        task = asyncio.create_task(outer(), name="probe")
        await asyncio.sleep(0.01)
        where = where_task_waits(task)
        task.cancel()
        return where

    where = asyncio.run(scenario())
    assert where.startswith("probe at ") and where.endswith("(sleep)"), where


def test_a_stream_closed_while_its_command_starts_leaves_no_process(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # the fault soak found a phone process nobody killed: the host closed a stream while its command
    # was being started, and cancelling the start killed only the shell, not the child it had forked.
    # A slow start widens that window here; the command's child must die with the stream all the same
    from server.sim import adbd
    from server.sim.sandbox import Sandbox

    real_spawn = asyncio.create_subprocess_exec
    marker = f"sleep {300 + os.getpid() % 100}.{os.getpid() % 97 + 1}"

    async def slow_spawn(*args: object, **kwargs: object) -> asyncio.subprocess.Process:
        proc = await real_spawn(*args, **kwargs)  # type: ignore[arg-type]
        await asyncio.sleep(0.5)  # still starting when the host closes the stream
        return proc

    monkeypatch.setattr(adbd.asyncio, "create_subprocess_exec", slow_spawn)

    def running() -> bool:
        return subprocess.run(["pgrep", "-f", marker], capture_output=True, check=False).returncode == 0

    async def scenario() -> None:
        sandbox = Sandbox(tmp_path, props={})
        sandbox.create()
        daemon = adbd.AdbDaemon(sandbox)
        port = await daemon.start()
        _reader, writer, local_id = await _open_stream(port, f"shell:{marker}; true", host_id=7)
        deadline = time.monotonic() + 5
        while not running() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert running()  # the command's child runs; its start has not returned yet
        writer.write(_packet(adbd.A_CLSE, 7, local_id))
        await writer.drain()
        await asyncio.sleep(1.0)
        writer.close()
        await asyncio.wait_for(daemon.stop(), 15)

    asyncio.run(scenario())
    deadline = time.monotonic() + 3
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running()


def test_listen_ports_are_outside_the_kernels_range_for_outgoing_connections() -> None:
    # a phone keeps its port across an unplug; a port from the outgoing range was soon some client
    # connection's own port under parallel tests, and the replug failed with "address already in use"
    from server.sim.adbd import EMULATOR_PORTS, _ephemeral_ports, listen_port

    ports = {listen_port() for _ in range(30)}
    assert len(ports) > 1
    outgoing = _ephemeral_ports()
    if outgoing.start > 20000:  # the usual Linux range (32768-60999): room below it
        assert all(20000 <= p < outgoing.start and p not in EMULATOR_PORTS for p in ports), sorted(ports)
