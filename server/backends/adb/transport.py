"""adb plumbing: which adb servers, clients without side effects, and `shell,v2,raw:` streams in asyncio.

Layers, as in adbutils: an adb *server* (host:port) is reached with an ``AdbClient``; a *stream* to a
phone is one TCP connection to that server switched to the phone (``host:transport:<serial>``) and
then to a service. We open streams with adbutils' blocking connection in a worker thread (explicit
short timeouts), then hand the socket to asyncio: everything after the handshake is non-blocking.

Shell protocol v2 (adb ``shell_protocol.h``), used for every phone command: each packet is
``id:u8 | length:u32le | data``; ids 0 stdin, 1 stdout, 2 stderr, 3 exit (1 byte: the code),
4 close-stdin (adb has no TCP half-close), 5 window size. ``raw`` means no pty: bytes pass unchanged.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from adbutils import AdbClient
from adbutils._adb import AdbConnection
from adbutils.errors import AdbConnectionError, AdbError

from server.errors import PhoneLost
from server.settings import Settings, SettingsInvalid, SettingsProblem, format_host_port, parse_host_port

DEFAULT_ADB_PORT = 5037

STDIN, STDOUT, STDERR, EXIT, CLOSE_STDIN, WINDOW_SIZE = range(6)
_HEADER = struct.Struct("<BI")
# adbd's shell protocol buffer holds ~32 KiB of data per packet; stay well under it
MAX_STDIN_CHUNK = 16 * 1024


# --------------------------------------------------------------------------- which adb servers


def parse_server(address: str) -> tuple[str, int]:
    """``"host:port"`` (or ``"tcp:host:port"``, ``"port"``) -> (host, port); ``ValueError`` otherwise."""
    return parse_host_port(address)


def format_server(host: str, port: int) -> str:
    return format_host_port(host, port)


def resolve_adb_servers(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> list[tuple[str, int]]:
    """The adb servers to use, as (host, port); the only place that reads the environment for adb.

    ``settings.adb_servers`` (each ``host:port``) wins. If it is empty: the local server, found as the
    ``adb`` tool itself finds it:

    1. ``ADB_SERVER_SOCKET=tcp:<host>:<port>`` (or ``tcp:<port>``, meaning localhost);
    2. ``ANDROID_ADB_SERVER_PORT=<port>`` on 127.0.0.1;
    3. 127.0.0.1:5037.

    Unix-socket servers (``localfilesystem:``) are not supported. Bad values raise
    :class:`~server.settings.SettingsInvalid` (a ``ValueError``) naming the variable.
    """
    if settings.adb_servers:
        servers = [parse_server(s) for s in settings.adb_servers]  # Settings validated them
    else:
        env = os.environ if environ is None else environ
        sock = env.get("ADB_SERVER_SOCKET", "").strip()
        port = env.get("ANDROID_ADB_SERVER_PORT", "").strip()
        name, value = ("ADB_SERVER_SOCKET", sock) if sock else ("ANDROID_ADB_SERVER_PORT", port)
        try:
            if sock:
                if not sock.startswith("tcp:"):
                    raise ValueError("only tcp:host:port is supported")
                servers = [parse_server(sock)]
            elif port:
                servers = [parse_server(f"127.0.0.1:{port}")]
            else:
                servers = [("127.0.0.1", DEFAULT_ADB_PORT)]
        except ValueError as e:
            raise SettingsInvalid([SettingsProblem("adb_servers", value, str(e), env=name)]) from e
    return list(dict.fromkeys(servers))  # unique, in order


class _Connection(AdbConnection):
    """adbutils' connection without its habit of spawning ``adb start-server`` when connect fails
    (which would start a server on the wrong port, or on this host for a remote server), and without
    leaking the socket of a failed connect."""

    def __init__(self, host: str, port: int, connect_timeout: float) -> None:
        self._address = (host, port)
        self._connect_timeout = connect_timeout
        super().__init__(host, port)

    def _safe_connect(self) -> socket.socket:
        try:
            sock = socket.create_connection(self._address, timeout=self._connect_timeout)
        except OSError as e:
            raise AdbConnectionError(
                f"connect to adb server {format_server(*self._address)} failed: {e}"
            ) from e
        # keepalive: a long-lived stream to a remote adb server notices a dead host
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock


class AdbServerClient(AdbClient):
    """An ``AdbClient`` for one adb server; every socket it makes gets ``timeout`` (adbutils' default
    is 600 s), so no blocking call can hang a worker thread for long."""

    def __init__(self, address: str, *, timeout: float) -> None:
        host, port = parse_server(address)
        super().__init__(host=host, port=port, socket_timeout=timeout)
        self.address = address
        self.timeout = timeout

    def make_connection(self, timeout: float | None = None) -> AdbConnection:
        conn = _Connection(self.host, self.port, min(self.timeout, 3.0))
        conn.conn.settimeout(timeout or self.timeout)
        return conn


# --------------------------------------------------------------------------- v2 packet framing


def encode_packet(kind: int, data: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(data)) + data


def encode_stdin(data: bytes) -> bytes:
    """stdin data as one or more packets no larger than adbd accepts."""
    if len(data) <= MAX_STDIN_CHUNK:
        return encode_packet(STDIN, data)
    return b"".join(
        encode_packet(STDIN, data[i : i + MAX_STDIN_CHUNK]) for i in range(0, len(data), MAX_STDIN_CHUNK)
    )


class V2Decoder:
    """Incremental shell-v2 packet decoder: feed it bytes as they come, get whole packets."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        packets: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 5:
            kind, length = _HEADER.unpack_from(buf, pos)
            if end - pos - 5 < length:
                break
            packets.append((kind, bytes(buf[pos + 5 : pos + 5 + length])))
            pos += 5 + length
        if pos:
            del buf[:pos]
        return packets

    @property
    def pending(self) -> int:
        return len(self._buf)


class LineBuffer:
    """Splits a byte stream into lines (without the newline); an endless line is cut at ``limit``."""

    def __init__(self, limit: int = 8192) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        if b"\n" not in data and len(self._buf) <= self._limit:
            return []
        *lines, rest = self._buf.split(b"\n")
        if len(rest) > self._limit:
            lines.append(rest)
            rest = bytearray()
        self._buf = rest
        return [bytes(line) for line in lines]

    def flush(self) -> bytes:
        rest, self._buf = bytes(self._buf), bytearray()
        return rest


# --------------------------------------------------------------------------- streams


def _open_blocking(client: AdbServerClient, serial: str, service: str) -> socket.socket:
    try:
        conn = client.make_connection()
    except AdbError as e:
        raise PhoneLost(f"{serial}: adb server {client.address} unreachable: {e}") from e
    try:
        conn.send_command(f"host:transport:{serial}")
        conn.check_okay()
        conn.send_command(service)
        conn.check_okay()
    except (AdbError, OSError) as e:
        conn.close()
        raise PhoneLost(f"{serial}: cannot open {service.split(':', 1)[0]} on {client.address}: {e}") from e
    sock: socket.socket = conn.conn
    sock.settimeout(None)
    return sock


async def open_socket(client: AdbServerClient, serial: str, service: str) -> socket.socket:
    """Open ``service`` on the phone in a worker thread; the socket is ours (closed if we are cancelled)."""
    fut = asyncio.ensure_future(asyncio.to_thread(_open_blocking, client, serial, service))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_close_unclaimed)
        raise


def _close_unclaimed(fut: asyncio.Future[socket.socket]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        fut.result().close()


class ShellStream:
    """One ``shell,v2,raw:`` stream in asyncio: stdin writes, demultiplexed reads, exit code."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, command: str) -> None:
        self.command = command
        self.exit_code: int | None = None
        self._reader = reader
        self._writer = writer
        self._decoder = V2Decoder()

    async def read_packets(self) -> list[tuple[int, bytes]]:
        """The next packets; ``[]`` means the stream ended (check ``exit_code``: None = dropped).

        Raises ``ConnectionError``/``OSError`` when the link fails abruptly."""
        while True:
            data = await self._reader.read(1 << 16)
            if not data:
                return []
            packets = self._decoder.feed(data)
            if packets:
                for kind, payload in packets:
                    if kind == EXIT and payload:
                        self.exit_code = payload[0]
                return packets

    def write_stdin(self, data: bytes) -> None:
        self._writer.write(encode_stdin(data))

    def close_stdin(self) -> None:
        if not self._writer.is_closing():
            self._writer.write(encode_packet(CLOSE_STDIN))

    async def drain(self) -> None:
        await self._writer.drain()

    @property
    def closed(self) -> bool:
        return self._writer.is_closing()

    def abort(self) -> None:
        """Close now; the adb server closes the phone side, which kills the process."""
        if not self._writer.is_closing():
            self._writer.transport.abort()


async def open_shell(client: AdbServerClient, serial: str, command: str) -> ShellStream:
    sock = await open_socket(client, serial, "shell,v2,raw:" + command)
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    return ShellStream(reader, writer, command)


@dataclass(slots=True)
class ShellResult:
    exit_code: int | None
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def text(self) -> str:
        return self.stdout.decode("utf-8", errors="replace")


async def run_shell(client: AdbServerClient, serial: str, command: str, *, timeout: float) -> ShellResult:
    """Run a short command to completion (stdout and stderr kept apart, exit code)."""
    stream: ShellStream | None = None
    out, err = bytearray(), bytearray()
    try:
        async with asyncio.timeout(timeout):
            stream = await open_shell(client, serial, command)
            stream.close_stdin()
            while packets := await stream.read_packets():
                for kind, data in packets:
                    if kind == STDOUT:
                        out += data
                    elif kind == STDERR:
                        err += data
    except TimeoutError as e:
        raise PhoneLost(f"{serial}: `{command[:80]}` took longer than {timeout:.0f} s") from e
    except (ConnectionError, OSError) as e:
        raise PhoneLost(f"{serial}: adb stream failed during `{command[:80]}`: {e}") from e
    finally:
        if stream is not None:
            stream.abort()
    return ShellResult(stream.exit_code if stream else None, bytes(out), bytes(err))


def _pull_blocking(client: AdbServerClient, serial: str, src: str, dst: str) -> int:
    try:
        return int(client.sync(serial).pull_file(src, dst))
    except (AdbError, OSError) as e:
        raise PhoneLost(f"{serial}: pull {src} failed: {e}") from e


async def pull_file(client: AdbServerClient, serial: str, src: str, dst: str) -> int:
    """adb sync pull in a worker thread (every recv bounded by the client's timeout)."""
    return await asyncio.to_thread(_pull_blocking, client, serial, src, dst)


def _track_blocking(client: AdbServerClient) -> socket.socket:
    conn = client.make_connection()  # AdbError when the server is unreachable
    try:
        conn.send_command("host:track-devices")
        conn.check_okay()
    except (AdbError, OSError):
        conn.close()
        raise
    sock: socket.socket = conn.conn
    sock.settimeout(None)
    return sock


async def open_tracker(client: AdbServerClient) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A ``host:track-devices`` connection to the adb server: it sends the device list now and on every
    change, and it ends (EOF or an error) when the server stops. Raises AdbError/OSError."""
    fut = asyncio.ensure_future(asyncio.to_thread(_track_blocking, client))
    try:
        sock = await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_close_unclaimed)
        raise
    return await asyncio.open_connection(sock=sock)


async def connect_device(client: AdbServerClient, address: str) -> str:
    """``adb connect <address>`` (a phone over TCP); the adb server's answer. Raises AdbError/OSError."""
    return await asyncio.to_thread(client.connect, address, client.timeout)


async def list_devices(client: AdbServerClient) -> dict[str, str]:
    """serial -> adb state (``device``, ``offline``, ``unauthorized`` ...). Raises AdbError/OSError."""
    infos = await asyncio.to_thread(client.list)
    return {info.serial: info.state for info in infos}
