"""Blocking file operations on a phone, for CLI commands: shell, sync STAT and sync SEND.

The server proper talks to phones from asyncio (server/backends/adb/transport.py); a CLI command may
block, so these are plain socket calls, each on its own adb stream and with an explicit timeout on
every send and receive (adbutils' default is 600 s). Stream set-up is transport's.

Sync is file transfer v1 (AOSP packages/modules/adb/SYNC.TXT): STAT answers mode, size and mtime as
u32 (so sizes are modulo 4 GiB; no bundle file comes near); SEND is ``SEND <path>,<mode>``, then
``DATA`` chunks of at most 64 KiB, then ``DONE <mtime>``, answered ``OKAY`` or ``FAIL <message>``.
SEND has no offset: a file is always sent whole.
"""

from __future__ import annotations

import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path

from adbutils.errors import AdbError  # type: ignore[import-untyped]

from server.backends.adb.transport import (
    CLOSE_STDIN,
    EXIT,
    STDERR,
    STDOUT,
    AdbServerClient,
    ShellResult,
    V2Decoder,
    _open_blocking,
    encode_packet,
)
from server.errors import PhoneLost

SYNC_DATA_MAX = 64 * 1024
_U32 = struct.Struct("<I")
_STAT = struct.Struct("<III")


class PushRefused(Exception):
    """The phone answered FAIL to a SEND (no space, read-only folder ...); the message is the phone's."""


def _open(client: AdbServerClient, serial: str, service: str, timeout: float) -> socket.socket:
    sock = _open_blocking(client, serial, service)  # PhoneLost when the phone or server is not there
    sock.settimeout(timeout)
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"link closed ({len(buf)} of {n} bytes read)")
        buf += chunk
    return bytes(buf)


def shell(client: AdbServerClient, serial: str, command: str, *, timeout: float) -> ShellResult:
    """Run ``command`` on the phone over ``shell,v2,raw:`` (stdout, stderr and exit code kept apart).

    PhoneLost when the link fails or the command outlives ``timeout``."""
    deadline = time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    exit_code: int | None = None
    sock = _open(client, serial, "shell,v2,raw:" + command, timeout)
    try:
        sock.sendall(encode_packet(CLOSE_STDIN))
        decoder = V2Decoder()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            data = sock.recv(1 << 16)
            if not data:
                break
            for kind, payload in decoder.feed(data):
                if kind == STDOUT:
                    out += payload
                elif kind == STDERR:
                    err += payload
                elif kind == EXIT and payload:
                    exit_code = payload[0]
    except TimeoutError as e:
        raise PhoneLost(f"{serial}: `{command[:80]}` took longer than {timeout:.0f} s") from e
    except OSError as e:
        raise PhoneLost(f"{serial}: adb stream failed during `{command[:80]}`: {e}") from e
    finally:
        sock.close()
    return ShellResult(exit_code, bytes(out), bytes(err))


def stat_sizes(client: AdbServerClient, serial: str, paths: list[str], *, timeout: float) -> dict[str, int | None]:
    """Size of each regular file in ``paths`` (None: missing or not a regular file), on one sync stream."""
    sizes: dict[str, int | None] = {}
    sock = _open(client, serial, "sync:", timeout)
    try:
        for path in paths:
            encoded = path.encode()
            sock.sendall(b"STAT" + _U32.pack(len(encoded)) + encoded)
            reply = _recv_exact(sock, 16)
            if reply[:4] != b"STAT":
                raise PhoneLost(f"{serial}: unexpected sync reply {reply[:4]!r} to STAT {path}")
            mode, size, _mtime = _STAT.unpack_from(reply, 4)
            sizes[path] = size if stat.S_ISREG(mode) else None
        sock.sendall(b"QUIT" + _U32.pack(0))
    except (OSError, EOFError) as e:
        raise PhoneLost(f"{serial}: sync STAT failed: {e}") from e
    finally:
        sock.close()
    return sizes


def push(client: AdbServerClient, serial: str, local: Path, remote: str, *, mode: int, timeout: float,
         on_bytes: Callable[[int], None] | None = None) -> int:
    """Send ``local`` to ``remote`` (whole; created or truncated) with permission bits ``mode``.

    ``on_bytes(n)`` is called after every chunk handed to the link. Returns the bytes sent.
    PhoneLost when the link fails, PushRefused when the phone answers FAIL."""
    sent = 0
    sock = _open(client, serial, "sync:", timeout)
    try:
        spec = f"{remote},{stat.S_IFREG | mode}".encode()
        sock.sendall(b"SEND" + _U32.pack(len(spec)) + spec)
        buf = bytearray(8 + SYNC_DATA_MAX)
        view = memoryview(buf)
        buf[:4] = b"DATA"
        with local.open("rb") as f:
            while n := f.readinto(view[8:]):
                _U32.pack_into(buf, 4, n)
                sock.sendall(view[: 8 + n])
                sent += n
                if on_bytes is not None:
                    on_bytes(n)
            mtime = int(local.stat().st_mtime)
        sock.sendall(b"DONE" + _U32.pack(mtime & 0xFFFFFFFF))
        # the phone answers once it has written the last chunk; allow for a slow flash write
        sock.settimeout(max(timeout, 30.0))
        reply = _recv_exact(sock, 8)
        if reply[:4] == b"OKAY":
            sock.sendall(b"QUIT" + _U32.pack(0))
            return sent
        if reply[:4] == b"FAIL":
            length = _U32.unpack_from(reply, 4)[0]
            raise PushRefused(_recv_exact(sock, length).decode("utf-8", "replace"))
        raise PhoneLost(f"{serial}: unexpected sync reply {reply[:4]!r} to SEND {remote}")
    except (OSError, EOFError) as e:
        raise PhoneLost(f"{serial}: push of {remote} broke after {sent} bytes: {e}") from e
    finally:
        sock.close()


def list_devices(client: AdbServerClient) -> dict[str, str]:
    """serial -> adb state (``device``, ``offline``, ``unauthorized`` ...) of one adb server."""
    try:
        return {info.serial: info.state for info in client.list()}
    except (AdbError, OSError) as e:
        raise PhoneLost(f"adb server {client.address} unreachable: {e}") from e
