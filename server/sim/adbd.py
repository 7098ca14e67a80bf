"""Device side of the adb transport for a simulated phone (asyncio).

The real adb server connects to it with ``adb connect 127.0.0.1:<port>``, exactly as to a phone with
adb over TCP. Layers, bottom up:

    AdbConnection   one TCP link: 24-byte message framing, CNXN handshake, stream table
    Stream          one adb stream (OPEN ... CLSE), one WRTE in flight, OKAY paces both directions
    services        small coroutines per service name: shell (v1), shell,v2, exec, sync (adb_sync.py)
    AdbDaemon       the listening socket of one phone, plus its transport fault knobs

Only what the host needs is implemented: no auth by default (the host accepts a device that never
asks; the ``handshake`` knob of :class:`AdbDaemon` can make the phone ``unauthorized`` or ``offline``), the
features ``shell_v2,cmd,fixed_push_mkdir`` and nothing else (so the host never uses stat_v2,
sendrecv_v2, abb or delayed_ack), no pty. Protocol reference: AOSP packages/modules/adb
(protocol.txt, SERVICES.TXT, SYNC.TXT, shell_protocol.h).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import random
import signal
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from server.sim.adb_sync import sync_service
from server.sim.lifetime import dying_with
from server.sim.sandbox import Sandbox

logger = logging.getLogger(__name__)

A_CNXN, A_OPEN, A_OKAY, A_CLSE, A_WRTE, A_AUTH = (
    int.from_bytes(name, "little") for name in (b"CNXN", b"OPEN", b"OKAY", b"CLSE", b"WRTE", b"AUTH")
)
AUTH_TOKEN, AUTH_SIGNATURE = 1, 2  # AUTH arg0: a challenge to sign, the host's signature (protocol.txt)
AUTH_TOKEN_BYTES = 20
# How a phone answers the host's CNXN (AdbDaemon.handshake): "device" answers it; "unauthorized" asks
# for a signature and never accepts one (a phone whose owner has not accepted the debugging prompt);
# "offline" never answers (the adb server lists the link as offline).
HANDSHAKES = ("device", "unauthorized", "offline")
# With this version the host skips checksum verification, so we send 0 as the checksum.
A_VERSION = 0x01000001
MAX_PAYLOAD = 1024 * 1024
FEATURES = "shell_v2,cmd,fixed_push_mkdir"
_HEADER = struct.Struct("<6I")

# shell protocol v2 packet ids (shell_protocol.h)
V2_STDIN, V2_STDOUT, V2_STDERR, V2_EXIT, V2_CLOSE_STDIN, V2_WINDOW_SIZE = range(6)
_V2_HEADER = struct.Struct("<BI")

# Ports the adb server scans on its own as emulators; a phone there would show up twice.
EMULATOR_PORTS = range(5555, 5586)
KILL_GRACE_S = 0.03  # SIGHUP -> SIGKILL; with reaping well inside the 100 ms budget
# stop(): how long the links may take to close by themselves before their commands are killed
STOP_GRACE_S = 5.0

Service = Callable[["Stream"], Awaitable[None]]


class StreamClosed(ConnectionError):
    """The stream was closed (by the host, or with its connection)."""


class Stream:
    """One adb stream. Writes wait for the host's OKAY of the previous WRTE (one in flight); host
    data is acknowledged when the service reads it, so a slow consumer slows the host down."""

    def __init__(self, conn: AdbConnection, local_id: int, remote_id: int) -> None:
        self.conn = conn
        self.local_id = local_id
        self.remote_id = remote_id
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self._inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._acked = asyncio.Event()
        self._acked.set()
        self._write_lock = asyncio.Lock()

    async def write(self, data: bytes) -> None:
        """Send data as WRTE packets of at most the negotiated payload size."""
        async with self._write_lock:
            for off in range(0, len(data), self.conn.max_payload):
                await self._acked.wait()
                if self.closed:
                    raise StreamClosed(f"stream {self.local_id} closed")
                self._acked.clear()
                self.conn.send(A_WRTE, self.local_id, self.remote_id, data[off : off + self.conn.max_payload])
            await self.conn.drain()

    async def read(self) -> bytes:
        """Next payload from the host; b"" once the host closed the stream."""
        data = await self._inbox.get()
        if data is None or self.closed:
            return b""
        self.conn.send(A_OKAY, self.local_id, self.remote_id)
        return data

    def close(self) -> None:
        """Device side ends the stream (no-op if already closed)."""
        if not self.closed:
            self.closed = True
            self.conn.send(A_CLSE, self.local_id, self.remote_id)
        self._wake()

    def on_okay(self) -> None:
        self._acked.set()

    def on_data(self, data: bytes) -> None:
        self._inbox.put_nowait(data)

    def on_close(self) -> None:
        """Host closed the stream (or the link died): stop the service, which kills its processes."""
        self.closed = True
        self._wake()
        if self.task is not None:
            self.task.cancel()

    def _wake(self) -> None:
        self._acked.set()
        self._inbox.put_nowait(None)


class AdbConnection:
    """One TCP link from the adb server: framing, handshake and dispatch to streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                 banner: str, resolve: Callable[[str], Service | None], handshake: str = "device") -> None:
        self.handshake = handshake
        self.reader = reader
        self.writer = writer
        self.banner = banner
        self.resolve = resolve
        self.max_payload = MAX_PAYLOAD
        self.streams: dict[int, Stream] = {}
        # every stream's service task until it is done, those the host closed (gone from ``streams``,
        # their clean-up still running) included: the link ends after all of them
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self.pgids: set[int] = set()  # process groups of the commands its streams run, until reaped

    def tasks(self) -> list[asyncio.Task[None]]:
        """Its streams' service tasks still running."""
        return list(self._tasks)

    def kill(self) -> None:
        """The last resort of a stop: SIGKILL every command's group and cancel every service."""
        for pgid in list(self.pgids):
            _killpg(pgid, signal.SIGKILL)
        for task in list(self._tasks):
            task.cancel()

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        if self.writer.is_closing():
            return
        header = _HEADER.pack(command, arg0, arg1, len(data), 0, command ^ 0xFFFFFFFF)
        self.writer.writelines((header, data) if data else (header,))

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def abort(self) -> None:
        """Drop the TCP link without a goodbye, like a phone losing its network."""
        self.writer.transport.abort()

    async def serve(self) -> None:
        """Read packets until the link closes; then stop every stream and wait for their cleanup."""
        try:
            while True:
                command, arg0, arg1, data = await self._read_packet()
                self._dispatch(command, arg0, arg1, data)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            logger.debug("adb link closed: %r", exc)
        finally:
            tasks = list(self._tasks)
            for stream in list(self.streams.values()):
                stream.on_close()
            self.streams.clear()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.writer.transport.abort()

    async def _read_packet(self) -> tuple[int, int, int, bytes]:
        command, arg0, arg1, length, _check, magic = _HEADER.unpack(await self.reader.readexactly(24))
        if magic != command ^ 0xFFFFFFFF:
            raise ConnectionError(f"bad adb packet magic {magic:#x} for command {command:#x}")
        return command, arg0, arg1, await self.reader.readexactly(length) if length else b""

    def _dispatch(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        if command in (A_CNXN, A_AUTH) and self.handshake != "device":
            # "unauthorized": a new challenge for the CNXN and for every signature (none is accepted);
            # the host's public key then gets no answer, as on a phone showing the debugging prompt
            if self.handshake == "unauthorized" and (command == A_CNXN or arg0 == AUTH_SIGNATURE):
                self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(AUTH_TOKEN_BYTES))
            return  # "offline": no answer at all
        if command == A_CNXN:
            # arg1 is the host's max payload; never send more than both sides accept
            self.max_payload = min(MAX_PAYLOAD, arg1) or MAX_PAYLOAD
            self.send(A_CNXN, A_VERSION, MAX_PAYLOAD, self.banner.encode())
        elif command == A_OPEN:
            self._open(arg0, data.rstrip(b"\0").decode("utf-8", "replace"))
        elif (stream := self.streams.get(arg1)) is not None:
            if command == A_OKAY:
                stream.on_okay()
            elif command == A_WRTE:
                stream.on_data(data)
            elif command == A_CLSE:
                self.streams.pop(arg1, None)
                stream.on_close()
        else:
            logger.debug("ignoring packet %#x for unknown stream %d", command, arg1)

    def _open(self, remote_id: int, name: str) -> None:
        service = self.resolve(name)
        if service is None:
            logger.info("refusing unknown adb service %r", name)
            self.send(A_CLSE, 0, remote_id)
            return
        stream = Stream(self, next(self._ids), remote_id)
        self.streams[stream.local_id] = stream
        self.send(A_OKAY, stream.local_id, remote_id)
        logger.debug("stream %d open: %r", stream.local_id, name)
        stream.task = task = asyncio.create_task(self._run(stream, service, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, stream: Stream, service: Service, name: str) -> None:
        try:
            await service(stream)
        except StreamClosed:
            pass
        except Exception:
            logger.exception("adb service %r failed", name)
        finally:
            stream.close()
            self.streams.pop(stream.local_id, None)


# ---------------------------------------------------------------------------------------------------
# services


def resolve_service(name: str, sandbox: Sandbox) -> Service | None:
    """Service coroutine for an OPEN destination, or None (the host then gets CLSE, i.e. refused)."""
    head, sep, command = name.partition(":")
    if not sep:
        return None
    options = head.split(",")
    if options[0] == "shell":
        # TERM=..., raw and pty options are accepted and ignored: we never allocate a pty
        v2 = "v2" in options[1:]
        return lambda stream: run_command(stream, sandbox, command, v2=v2)
    if head == "exec":
        return lambda stream: run_command(stream, sandbox, command, v2=False)
    if head == "sync":
        return lambda stream: sync_service(stream, sandbox)
    return None


def _ephemeral_ports() -> range:
    """The ports the kernel hands out for outgoing connections (Linux's ip_local_port_range)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def listen_port(host: str = "127.0.0.1") -> int:
    """A free port for a simulated phone or its private adb server to listen on, from 20000-32767
    outside the kernel's range for outgoing connections and the adb emulator scan range: such a port
    stays free while the phone is unplugged (or the adb server restarts), so it can bind it again; a
    port the kernel picks (port 0) is soon some client connection's own port (seen under parallel
    tests: a replug failed with "address already in use"). Falls back to the kernel's choice when the
    machine's outgoing range covers all of them."""
    ephemeral = _ephemeral_ports()
    candidates = [p for p in range(20000, 32768) if p not in ephemeral and p not in EMULATOR_PORTS]
    # a generator of its own: the module's is seeded alike in every test worker by hypothesis, and the
    # workers then tried the same ports in the same order
    for port in random.SystemRandom().sample(candidates, min(len(candidates), 50)):
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def where_task_waits(task: asyncio.Task[Any]) -> str:
    """``name at file:line (function)`` of the innermost coroutine ``task`` waits in (a task's own
    stack shows only its outermost frame): what a diagnosis of a hang must name."""
    frame = None
    awaited: Any = task.get_coro()
    while awaited is not None:
        inner = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if inner is None:
            break
        frame = inner
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    if frame is None:
        return f"{task.get_name()} (not started or done)"
    return f"{task.get_name()} at {frame.f_code.co_filename}:{frame.f_lineno} ({frame.f_code.co_name})"


def v2_packet(packet_id: int, data: bytes) -> bytes:
    return _V2_HEADER.pack(packet_id, len(data)) + data


async def run_command(stream: Stream, sandbox: Sandbox, command: str, *, v2: bool) -> None:
    """Run a command under /bin/sh -c in the sandbox, in its own session (process group).

    v1 (and exec) merge stderr into stdout and carry no exit code; v2 frames stdout, stderr and the
    exit code. Output is forwarded chunk by chunk as it is produced. When the command's leader exits
    its leftover group members are killed too, so no phone process outlives its stream.
    """
    argv = ["/bin/sh", "-c", sandbox.rewrite_command(command)] if command else ["/bin/sh"]
    spawn = asyncio.ensure_future(asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if v2 else asyncio.subprocess.STDOUT,
        cwd=sandbox.root, env=sandbox.env(), start_new_session=True,
        # no phone process outlives the host that runs this adbd, even a SIGKILLed one (lifetime.py);
        # the loop thread forking it lives as long as the phone
        preexec_fn=dying_with(os.getpid()),  # a prctl and a getppid between fork and exec: nothing that locks
    ))
    try:
        proc = await asyncio.shield(spawn)
    except asyncio.CancelledError:
        # the stream closed while its command was starting. Cancelling the start itself kills only the
        # shell (asyncio's clean-up) and then waits for its pipes, which a child the shell had started
        # holds open for ever: a process nobody kills and a stop that never ends (seen in the fault soak).
        # Let it start, then kill its whole group as for any other closed stream.
        with contextlib.suppress(Exception):
            await _kill_group(await spawn)
        raise
    assert proc.stdin is not None and proc.stdout is not None
    stream.conn.pgids.add(proc.pid)
    pipes = [(proc.stdout, V2_STDOUT)] + ([(proc.stderr, V2_STDERR)] if proc.stderr is not None else [])
    pumps = [asyncio.create_task(_pump(stream, pipe, packet_id if v2 else None)) for pipe, packet_id in pipes]
    feeder = asyncio.create_task(_feed_stdin(stream, proc.stdin, v2=v2))
    try:
        # wait() returns once the leader exited and both pipes hit EOF (like adbd, a background
        # child holding stdout keeps the command open); group members left over die now
        returncode = await proc.wait()
        _killpg(proc.pid, signal.SIGKILL)
        await asyncio.wait(pumps)  # not gather: a cancel here must not cancel the pumps' draining
        if v2:
            # a process killed by a signal reports 128+signal, as a shell would
            status = returncode if returncode >= 0 else 128 - returncode
            await stream.write(v2_packet(V2_EXIT, bytes([status & 0xFF])))
    finally:
        feeder.cancel()
        proc.stdin.close()
        try:
            await _kill_group(proc)
            await _finish(pumps)
        finally:
            stream.conn.pgids.discard(proc.pid)


async def _pump(stream: Stream, pipe: asyncio.StreamReader, packet_id: int | None) -> None:
    """Forward a pipe to the stream as data arrives; after the stream closes, drain to EOF."""
    limit = stream.conn.max_payload - (_V2_HEADER.size if packet_id is not None else 0)
    while chunk := await pipe.read(limit):
        if stream.closed:
            continue
        with contextlib.suppress(StreamClosed):
            await stream.write(v2_packet(packet_id, chunk) if packet_id is not None else chunk)


async def _feed_stdin(stream: Stream, stdin: asyncio.StreamWriter, *, v2: bool) -> None:
    buffer = bytearray()
    try:
        while data := await stream.read():
            if not v2:
                stdin.write(data)
                await stdin.drain()
                continue
            buffer += data
            while len(buffer) >= _V2_HEADER.size:
                packet_id, length = _V2_HEADER.unpack_from(buffer)
                if len(buffer) < _V2_HEADER.size + length:
                    break
                payload = bytes(buffer[_V2_HEADER.size : _V2_HEADER.size + length])
                del buffer[: _V2_HEADER.size + length]
                if packet_id == V2_STDIN:
                    stdin.write(payload)
                    await stdin.drain()
                elif packet_id == V2_CLOSE_STDIN:
                    stdin.close()
                # V2_WINDOW_SIZE and anything else: no pty, nothing to resize
    except (BrokenPipeError, ConnectionResetError):
        logger.debug("stdin of stream %d: process no longer reads", stream.local_id)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGHUP the command's group (what a hung-up adb shell gets), SIGKILL it after a short grace."""
    if proc.returncode is None:
        _killpg(proc.pid, signal.SIGHUP)
        try:
            await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            _killpg(proc.pid, signal.SIGKILL)
            raise
    # The leader may be gone while members of its group still run; the pgid stays reserved as long
    # as any member lives, so this cannot hit an unrelated process.
    _killpg(proc.pid, signal.SIGKILL)
    try:
        await asyncio.wait_for(proc.wait(), 1.0)
    except TimeoutError:  # only if a process left the group (setsid) and still holds a pipe
        logger.warning("phone command %d: a process outside its group still holds its pipes", proc.pid)


async def _finish(tasks: list[asyncio.Task[None]]) -> None:
    """Let pumps drain the pipes to EOF (that closes the subprocess transport); give up after 1 s."""
    _done, pending = await asyncio.wait(tasks, timeout=1.0)
    for task in pending:
        task.cancel()


# ---------------------------------------------------------------------------------------------------
# the listening side


class AdbDaemon:
    """The adbd of one simulated phone: listens on host:port and serves every link the host opens.

    Fault knobs (call them on the daemon's event loop; SimPhone marshals from other threads):
    :meth:`drop_connections` cuts the live links, ``refuse`` closes new links at once, ``handshake``
    (one of :data:`HANDSHAKES`) is how new links are answered.
    """

    def __init__(self, sandbox: Sandbox, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sandbox = sandbox
        self.host = host
        self.port = port
        self.refuse = False
        self.handshake = "device"
        self._server: asyncio.Server | None = None
        self._connections: set[AdbConnection] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def banner(self) -> str:
        props = self.sandbox.props
        fields = [f"{key}={props.get(key, '')}" for key in
                  ("ro.product.name", "ro.product.model", "ro.product.device")]
        return "device::" + ";".join(fields) + f";features={FEATURES}"

    async def start(self) -> int:
        """Bind and return the port; with port 0, a free one of :func:`listen_port`'s, kept for later
        starts (a replug), so that the phone's serial stays the same."""
        for attempt in itertools.count():
            try:
                server = await asyncio.start_server(self._accept, self.host, self.port or listen_port())
                break
            except OSError as exc:  # taken between the check and the bind: another one
                if self.port or exc.errno != errno.EADDRINUSE or attempt >= 20:
                    raise
        port: int = server.sockets[0].getsockname()[1]
        self._server, self.port = server, port
        logger.info("simulated adbd listening on %s:%d (%s)", self.host, port, self.sandbox.root)
        return port

    async def stop(self) -> None:
        """Stop listening, drop every link and wait until every phone process is dead."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.drop_connections()
        if not self._handlers:
            return
        _done, pending = await asyncio.wait(set(self._handlers), timeout=STOP_GRACE_S)
        if pending:
            # a link whose commands outlive it (seen once in the fault soak, cause unknown): say where its
            # tasks wait, so that it can be fixed, and kill them, so that a stop never hangs
            stuck = [t for conn in self._connections for t in conn.tasks()] + list(pending)
            logger.warning("simulated adbd %s: %d link(s) still open %g s after the stop; killing their "
                           "commands; waiting at: %s", self.sandbox.root, len(pending), STOP_GRACE_S,
                           "; ".join(where_task_waits(t) for t in stuck))
            for conn in list(self._connections):
                conn.kill()
            await asyncio.wait(pending, timeout=STOP_GRACE_S)

    def drop_connections(self) -> None:
        for conn in list(self._connections):
            conn.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse or self._server is None:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        conn = AdbConnection(reader, writer, banner=self.banner,
                             resolve=lambda name: resolve_service(name, self.sandbox), handshake=self.handshake)
        self._connections.add(conn)
        self._handlers.add(task)
        try:
            await conn.serve()
        finally:
            self._connections.discard(conn)
            self._handlers.discard(task)
