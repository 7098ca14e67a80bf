"""Simulated phones behind a private, real adb server, usable from synchronous code.

    with SimLab(phones=2) as lab:
        client = adbutils.AdbClient(host="127.0.0.1", port=lab.adb_port)
        lab.phones[0].configure(speed=0)

`SimLab` runs the phones' asyncio adbds in a daemon thread's event loop, starts the adb binary shipped
in the adbutils wheel as its own child (``adb server nodaemon``, isolated HOME, no mDNS, USB or
emulator scanning) on a free port and ``adb connect``s every phone. Teardown kills the adb server and
every phone process, so a lab leaves nothing running.

The lab owns its adb server and supervises it, as systemd would a real one: when it dies (killed, or
:meth:`SimLab.kill_adb_server` as a fault), a watchdog thread starts it again on the same port and
``adb connect``s every plugged-in phone again (``supervise_adb=False`` leaves that to the caller:
:meth:`SimLab.restart_adb_server`). Phones can be pulled out and plugged in again with their serial,
sandbox and port kept (:meth:`SimLab.unplug`, :meth:`SimLab.replug`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import adbutils
from adbutils._adb import AdbConnection

from server.sim.adbd import EMULATOR_PORTS, HANDSHAKES, AdbDaemon, listen_port, where_task_waits
from server.sim.lifetime import dying_with_us
from server.sim.sandbox import Sandbox, default_props
from server.sim.staging import stage_phone

logger = logging.getLogger(__name__)

T = TypeVar("T")
ADB_SERVER_PORT_DEFAULT = 5037


class _LoopThread:
    """An asyncio event loop in a daemon thread; sync callers submit work and wait for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="qhx-sim-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("SimLab's blocking API cannot be called from its own event loop")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:  # the coroutine goes on (as before): only the caller stops waiting
            raise TimeoutError(f"the simulated phones' loop did not finish in {timeout:g} s; {self._where()}") from None

    def _where(self) -> str:
        """What the loop thread is doing, and where its tasks wait: what a timeout must say to be fixed."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)[-6:]) if frame is not None else "(no thread)\n"
        try:  # read from another thread while the loop runs: good enough for a diagnosis, may change under us
            tasks = list(asyncio.all_tasks(self.loop))
        except RuntimeError:
            tasks = []
        waits = [where_task_waits(task) for task in tasks]
        return f"loop thread at:\n{stack}tasks: " + "; ".join(sorted(waits)[:20])

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the loop (directly when already there) and return its result."""
        if threading.current_thread() is self._thread:
            return fn()

        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout=10.0)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class SimPhone:
    """One simulated phone: a sandbox folder standing in for its filesystem and an adbd on
    ``host:port``. Its serial is what the adb server calls it after ``adb connect``."""

    def __init__(self, sandbox_dir: Path, runner: _LoopThread, *, soc: str = "SM8850",
                 precision: str = "fp16", name: str = "qhxsim", host: str = "127.0.0.1", port: int = 0,
                 props: dict[str, str] | None = None, env: dict[str, str] | None = None,
                 sim_config: dict[str, Any] | None = None) -> None:
        self.soc = soc
        self.precision = precision
        self.props: dict[str, str] = {**default_props(soc=soc, name=name), **(props or {})}
        self._sandbox = Sandbox(sandbox_dir, props=self.props, env=env)
        self._sim_config = dict(sim_config or {})
        self._runner = runner
        self._daemon = AdbDaemon(self._sandbox, host=host, port=port)
        self.started = False

    @property
    def sandbox(self) -> Path:
        return self._sandbox.root

    @property
    def env(self) -> dict[str, str]:
        """Extra environment of phone commands; changes apply to commands started afterwards."""
        return self._sandbox.extra_env

    @property
    def host(self) -> str:
        return self._daemon.host

    @property
    def port(self) -> int:
        return self._daemon.port

    @property
    def serial(self) -> str:
        return f"{self._daemon.host}:{self._daemon.port}"

    def start(self) -> SimPhone:
        """Create and stage the sandbox, then listen."""
        self._sandbox.create()
        stage_phone(self.sandbox, precision=self.precision, soc=self.soc, props=self.props,
                    sim_config=self._sim_config)
        self._sandbox.reload_props()
        self._runner.run(self._daemon.start())
        self.started = True
        return self

    def stop(self) -> None:
        """Stop listening, drop links, kill every process of this phone. Idempotent."""
        if self.started:
            self.started = False
            self._runner.run(self._daemon.stop())

    def plug(self) -> None:
        """Listen again on the same port after :meth:`stop`, keeping the sandbox (a phone plugged in
        again: same serial, same files; its processes are gone)."""
        if not self.started:
            self._runner.run(self._daemon.start())
            self.started = True

    def configure(self, **knobs: Any) -> None:
        """Merge knobs into ``<sandbox>/sim.json`` atomically; the simulated runtime re-reads it."""
        self._sandbox.configure(**knobs)

    def drop_connections(self) -> None:
        """Cut the TCP links to the adb server abruptly (the host sees the phone go offline)."""
        self._runner.call(self._daemon.drop_connections)

    def refuse_connections(self, flag: bool) -> None:
        """While set, new TCP connections are closed as soon as they are accepted."""

        def set_refuse() -> None:
            self._daemon.refuse = flag

        self._runner.call(set_refuse)

    def set_adb_state(self, state: str) -> None:
        """How the adb server will list this phone: ``device``, ``unauthorized`` (it asks the host to
        sign and never accepts, as before the owner accepts the debugging prompt) or ``offline`` (it
        never answers the handshake). The live links are cut so the adb server reconnects and sees it;
        wait with ``SimLab.wait_for_devices([serial], state=...)``."""
        if state not in HANDSHAKES:
            raise ValueError(f"adb state must be one of {HANDSHAKES}, not {state!r}")

        def apply() -> None:
            self._daemon.handshake = state
            self._daemon.drop_connections()

        self._runner.call(apply)

    def phone_path(self, path: str) -> Path:
        """Host path of a phone path: ``/data/local/tmp/x`` -> ``<sandbox>/data/local/tmp/x``."""
        return self._sandbox.phone_path(path)

    def __repr__(self) -> str:
        return f"SimPhone({self.serial}, soc={self.soc}, precision={self.precision})"


class SimLab:
    """N simulated phones connected to a private adb server (see the module docstring).

    ``private_adb=False`` serves the phones only (for the user's own adb server to connect to);
    ``base_port`` gives phones consecutive ports from there instead of free ones. ``checkpoints``
    sets the phones' checkpoint slots (session protocol v1.1; 0 = v1 runtimes; default: the knob's 4).
    """

    def __init__(self, phones: int = 1, *, precision: str = "fp16", soc: str = "SM8850", speed: float = 1.0,
                 workdir: Path | None = None, sim_config: dict[str, Any] | None = None,
                 private_adb: bool = True, host: str = "127.0.0.1", base_port: int | None = None,
                 checkpoints: int | None = None, supervise_adb: bool = True) -> None:
        self.initial_phones = phones
        self.precision = precision
        self.soc = soc
        slots = {} if checkpoints is None else {"checkpoints": checkpoints}
        self.sim_config: dict[str, Any] = {"speed": speed, **slots, **(sim_config or {})}
        self.private_adb = private_adb
        self.host = host
        self.base_port = base_port
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="qhx-sim-"))
        self.adb_binary: str = adbutils.adb_path()
        self.adb_port = 0
        self.phones: list[SimPhone] = []
        self._runner: _LoopThread | None = None
        self._adb_proc: subprocess.Popen[bytes] | None = None
        self._counter = 0
        self.supervise_adb = supervise_adb
        self.adb_restarts = 0  # times the watchdog (or restart_adb_server) started the adb server again
        self._adb_lock = threading.Lock()  # one start or stop of the adb server at a time
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def adb_server(self) -> str:
        return f"127.0.0.1:{self.adb_port}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Self:
        """Start the adb server (unless private_adb=False) and the phones; wait until all are "device"."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._runner = _LoopThread()
        self._stopping.clear()
        try:
            if self.private_adb:
                self.adb_port = free_port()
                self._start_adb_server()
            for _ in range(self.initial_phones):
                self.add_phone(connect=False)
            if self.private_adb:
                for phone in self.phones:
                    self._connect(phone)
                self.wait_for_devices([p.serial for p in self.phones])
                if self.supervise_adb:
                    self._watchdog = threading.Thread(target=self._watch_adb_server, name="qhx-sim-adb-watchdog",
                                                      daemon=True)
                    self._watchdog.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill the adb server, stop every phone and its processes. Idempotent."""
        self._stopping.set()  # before the kill: the watchdog must not start the server again
        with self._adb_lock:
            self._stop_adb_server()
        if self._watchdog is not None:
            self._watchdog.join(timeout=10)
            self._watchdog = None
        for phone in self.phones:
            phone.stop()
        self.phones.clear()
        if self._runner is not None:
            self._runner.close()
            self._runner = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def add_phone(self, *, soc: str | None = None, precision: str | None = None, connect: bool = True,
                  **kw: Any) -> SimPhone:
        """Start one more phone (kw: name, props, env, sim_config, port) and connect it."""
        if self._runner is None:
            raise RuntimeError("SimLab is not started")
        self._counter += 1
        index = self._counter
        if self.base_port is not None:
            kw.setdefault("port", self.base_port + index - 1)
        sim_config = {**self.sim_config, **kw.pop("sim_config", {})}
        phone = SimPhone(self.workdir / f"phone{index}", self._runner, soc=soc or self.soc,
                         precision=precision or self.precision, host=self.host,
                         name=kw.pop("name", f"qhxsim{index}"), sim_config=sim_config, **kw)
        phone.start()
        self.phones.append(phone)
        if connect and self.private_adb:
            self._connect(phone)
            self.wait_for_devices([phone.serial])
        return phone

    def remove_phone(self, serial: str) -> None:
        """``adb disconnect`` the phone and stop it."""
        phone = self.phone(serial)
        if self.private_adb:
            self.adb("disconnect", serial)
        phone.stop()
        self.phones.remove(phone)

    def phone(self, serial: str) -> SimPhone:
        """The lab's phone with that serial (KeyError if none)."""
        phone = next((p for p in self.phones if p.serial == serial), None)
        if phone is None:
            raise KeyError(f"no simulated phone {serial}")
        return phone

    def unplug(self, serial: str) -> None:
        """Pull the phone out: the adb server forgets it (``adb disconnect``), its processes die; it
        keeps its serial, sandbox and port for :meth:`replug`."""
        phone = self.phone(serial)
        if self.private_adb:
            self.adb("disconnect", serial)
        phone.stop()

    def replug(self, serial: str, *, wait: bool = True) -> None:
        """Plug an unplugged phone in again (same serial) and connect it."""
        phone = self.phone(serial)
        phone.plug()
        if self.private_adb:
            self._connect(phone)
            if wait:
                self.wait_for_devices([serial])

    def kill_adb_server(self) -> int:
        """SIGKILL the private adb server, as a crash would (every phone link drops with it); the
        watchdog starts it again unless ``supervise_adb`` is off. Returns the killed pid."""
        proc = self._adb_proc
        if proc is None:
            raise RuntimeError("the lab runs no adb server")
        proc.kill()
        proc.wait()
        return proc.pid

    def restart_adb_server(self, *, connect: bool = True) -> None:
        """Start the adb server again on the same port (killing it first if it still runs) and
        ``adb connect`` every plugged-in phone: what the watchdog does when the server dies.
        ``connect=False``: leave the phones unconnected (a new adb server knows no phone over TCP)."""
        self._restart_adb_server(self._adb_proc, connect=connect)

    def _restart_adb_server(self, old: subprocess.Popen[bytes] | None, *, connect: bool = True) -> bool:
        """Replace adb server ``old`` by a new one; False when someone else replaced it already (or
        the lab is stopping)."""
        with self._adb_lock:
            if self._stopping.is_set() or self._adb_proc is not old:
                return False
            if old is not None and old.poll() is None:
                old.kill()
                old.wait()
            self._start_adb_server()
            self.adb_restarts += 1
            for phone in list(self.phones):
                if phone.started and connect:
                    try:
                        self._connect(phone)
                    except (RuntimeError, subprocess.SubprocessError) as e:  # the others still get theirs
                        logger.warning("%s not connected to the restarted adb server: %s", phone.serial, e)
            return True

    def _watch_adb_server(self) -> None:
        """The lab's supervisor of its adb server: start it again whenever it dies, until stop()."""
        while not self._stopping.is_set():
            proc = self._adb_proc
            if proc is None:
                return
            proc.wait()
            if self._stopping.is_set() or proc is not self._adb_proc:
                continue  # stopping, or restarted by restart_adb_server() meanwhile
            logger.warning("private adb server (pid %d) exited with %s; starting it again on port %d",
                           proc.pid, proc.returncode, self.adb_port)
            try:
                self._restart_adb_server(proc)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                logger.warning("private adb server did not start again (%s); retrying", e)
                self._stopping.wait(0.5)

    def _stop_adb_server(self) -> None:
        if self._adb_proc is not None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.adb("kill-server", timeout=5)
            try:
                self._adb_proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._adb_proc.kill()
                self._adb_proc.wait()
            self._adb_proc = None

    def adb(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
        """Run the real adb CLI against this lab's server. It never starts one: told the port with
        ``-P``, the CLI starts a server of its own when none answers (a daemon, in a session of its
        own, outside the lab), and with the lab's server killed at that moment the lab's next one
        could not bind the port; given ``tcp:127.0.0.1:<port>`` (``-L``) it only connects."""
        return subprocess.run([self.adb_binary, "-L", self.adb_socket, *args], check=False, env=self.env(),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                              timeout=timeout)

    @property
    def adb_socket(self) -> str:
        """The adb server as adb's socket spec; a host other than ``localhost`` keeps adb from starting a
        server there when none answers."""
        return f"tcp:127.0.0.1:{self.adb_port}"

    def env(self) -> dict[str, str]:
        """Environment for child processes that should use this lab's adb server."""
        # a socket or serial chosen for another adb server must not leak into the lab's children
        env = {k: v for k, v in os.environ.items() if k not in ("ADB_SERVER_SOCKET", "ANDROID_SERIAL")}
        env.update({
            # adbutils' auto-start and the adb CLI both read the port from here
            "ANDROID_ADB_SERVER_PORT": str(self.adb_port),
            # ... and the CLI this first: with it, an adb command run while the lab's server is down
            # fails instead of starting a server of its own on the lab's port (see adb())
            "ADB_SERVER_SOCKET": self.adb_socket,
            # the adb server writes ~/.android (keys); keep that in the lab
            "HOME": str(self.workdir / "home"),
            "ANDROID_ADB_LOG_PATH": str(self.workdir / "adb.log"),
            # nothing but the lab's phones: no mDNS on the network, no USB phones, no emulator scan
            "ADB_MDNS": "0",
            "ADB_USB": "0",
            "ADB_EMU": "0",
        })
        return env

    def wait_for_devices(self, serials: list[str], state: str = "device", timeout: float = 20.0) -> None:
        """Block until every serial is listed by the adb server in that state."""
        client = LabAdbClient(port=self.adb_port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = {d.serial: d.state for d in client.list()}
            except (adbutils.AdbError, OSError):  # the server is down for a moment (restarted)
                states = {}
            if all(states.get(s) == state for s in serials):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"phones not '{state}' after {timeout} s: {states}")
            time.sleep(0.02)

    def _connect(self, phone: SimPhone) -> None:
        result = self.adb("connect", phone.serial)
        if "connected to" not in result.stdout:
            raise RuntimeError(f"adb connect {phone.serial} failed: {result.stdout}{result.stderr}")

    def _start_adb_server(self) -> None:
        """Run the adb server on ``adb_port`` as our own child (not a daemon), so teardown can always
        reap it."""
        (self.workdir / "home").mkdir(exist_ok=True)
        assert self._runner is not None
        self._evict_foreign_adb_server()
        env = {k: v for k, v in self.env().items() if k != "ADB_SERVER_SOCKET"}  # the server listens on -P
        with open(self.workdir / "adb-server.log", "ab") as log:
            # forked from the lab's loop thread, which lives as long as the lab, and killed by the
            # kernel when it ends: a SIGKILLed qhx-server leaves no adb server behind (lifetime.py)
            self._adb_proc = self._runner.call(lambda: subprocess.Popen(
                dying_with_us([self.adb_binary, "-P", str(self.adb_port), "server", "nodaemon"]), env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 10
        while not _accepts(self.adb_port):
            if self._adb_proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"adb server did not start, see {self.workdir / 'adb-server.log'}")
            time.sleep(0.01)
        logger.info("private adb server on 127.0.0.1:%d (pid %d)", self.adb_port, self._adb_proc.pid)

    def _evict_foreign_adb_server(self) -> None:
        """The lab's port is the lab's: an adb server that answers there while the lab's own is down
        (started by an adb client that found none, with ``-P`` or ANDROID_ADB_SERVER_PORT) is told to
        exit; else the lab's server could not bind the port and would die at once, again and again."""
        if not _accepts(self.adb_port):
            return
        logger.warning("an adb server the lab did not start answers on port %d; stopping it", self.adb_port)
        deadline = time.monotonic() + 5
        while _accepts(self.adb_port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.adb_port} is taken by something that is not the lab's adb server")
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.adb("kill-server", timeout=5)
            time.sleep(0.1)


class _Connection(AdbConnection):
    def _safe_connect(self) -> socket.socket:
        return self._create_socket()  # type: ignore[no-any-return]


class LabAdbClient(adbutils.AdbClient):
    """An adbutils client of the lab's adb server that never runs ``adb start-server``: adbutils does
    when a connection fails, on the default port or the calling process's ANDROID_ADB_SERVER_PORT, so
    asking while the lab's server is down (killed as a fault) left a stray adb server behind."""

    def __init__(self, port: int, socket_timeout: float = 5.0) -> None:
        super().__init__(host="127.0.0.1", port=port, socket_timeout=socket_timeout)
        self._lab_port, self._lab_timeout = port, socket_timeout

    def make_connection(self, timeout: float | None = None) -> AdbConnection:
        conn = _Connection("127.0.0.1", self._lab_port)
        conn.conn.settimeout(timeout or self._lab_timeout)
        return conn


def free_port() -> int:
    """A free TCP port on 127.0.0.1 outside the adb emulator scan range, the default adb port and the
    kernel's range for outgoing connections (:func:`~server.sim.adbd.listen_port`): the private adb
    server is started again on it after a kill."""
    while True:
        port = listen_port()
        if port not in EMULATOR_PORTS and port != ADB_SERVER_PORT_DEFAULT:
            return port


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
