"""The ``sync:`` service of the simulated adbd: file transfer v1 (STAT, LIST, SEND, RECV, QUIT).

Requests are ``<id:4><len:u32le><path>``; SEND is followed by DATA/DONE chunks from the host. Paths
are phone paths, mapped into the sandbox like a chroot, so nothing outside it is read or written.
Only v1 is spoken: the device does not advertise stat_v2/ls_v2/sendrecv_v2, so hosts do not ask.
Reference: AOSP packages/modules/adb/SYNC.TXT and file_sync_protocol.h.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from server.sim.sandbox import Sandbox

if TYPE_CHECKING:
    from server.sim.adbd import Stream

logger = logging.getLogger(__name__)

SYNC_DATA_MAX = 64 * 1024
_U32 = struct.Struct("<I")
_STAT = struct.Struct("<III")


class _SyncIO:
    """Byte-level reads over a stream's WRTE payloads, and batched writes (many sync messages per
    WRTE, so a pull is not paced by one round trip per 64 KiB chunk)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._in = bytearray()
        self._out = bytearray()

    async def read_exact(self, n: int) -> bytes:
        while len(self._in) < n:
            data = await self.stream.read()
            if not data:
                raise EOFError
            self._in += data
        chunk = bytes(self._in[:n])
        del self._in[:n]
        return chunk

    async def read_request(self) -> tuple[bytes, bytes]:
        header = await self.read_exact(8)
        return header[:4], await self.read_exact(_U32.unpack_from(header, 4)[0])

    async def write(self, message: bytes) -> None:
        self._out += message
        if len(self._out) + SYNC_DATA_MAX + 8 > self.stream.conn.max_payload:
            await self.flush()

    async def flush(self) -> None:
        if self._out:
            data, self._out = bytes(self._out), bytearray()
            await self.stream.write(data)

    async def fail(self, message: str) -> None:
        encoded = message.encode()
        await self.write(b"FAIL" + _U32.pack(len(encoded)) + encoded)
        await self.flush()


async def sync_service(stream: Stream, sandbox: Sandbox) -> None:
    """Serve sync requests until QUIT or the host closes the stream."""
    io = _SyncIO(stream)
    handlers = {b"STAT": _stat, b"LIST": _list, b"SEND": _send, b"RECV": _recv}
    try:
        while True:
            command, arg = await io.read_request()
            if command == b"QUIT":
                return
            handler = handlers.get(command)
            if handler is None:
                await io.fail(f"unsupported sync command {command!r}")
                return
            await handler(io, sandbox, arg.decode("utf-8", "surrogateescape"))
            await io.flush()
    except EOFError:
        return


def _host_path(sandbox: Sandbox, path: str) -> Path | None:
    try:
        return sandbox.phone_path(path)
    except ValueError:
        return None


def _stat_fields(st: os.stat_result) -> bytes:
    return _STAT.pack(st.st_mode & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF, int(st.st_mtime) & 0xFFFFFFFF)


async def _stat(io: _SyncIO, sandbox: Sandbox, path: str) -> None:
    host = _host_path(sandbox, path)
    try:
        fields = _stat_fields(os.stat(host)) if host is not None else _STAT.pack(0, 0, 0)
    except OSError:
        fields = _STAT.pack(0, 0, 0)  # v1 says "does not exist" with all zeros
    await io.write(b"STAT" + fields)


async def _list(io: _SyncIO, sandbox: Sandbox, path: str) -> None:
    host = _host_path(sandbox, path)
    try:
        names = [".", ".."] + sorted(os.listdir(host)) if host is not None else []
    except OSError:
        names = []
    for name in names:
        try:
            fields = _stat_fields(os.lstat(host / name))  # type: ignore[operator]
        except OSError:
            continue
        encoded = name.encode("utf-8", "surrogateescape")
        await io.write(b"DENT" + fields + _U32.pack(len(encoded)) + encoded)
    await io.write(b"DONE" + bytes(16))


async def _send(io: _SyncIO, sandbox: Sandbox, spec: str) -> None:
    path, comma, mode_text = spec.rpartition(",")
    if not comma:
        path, mode_text = spec, ""
    host = _host_path(sandbox, path)
    error: str | None = None if host is not None else f"{path}: outside the phone's filesystem"
    handle = None
    if host is not None:
        try:
            # fixed_push_mkdir: the device creates missing parent folders
            host.parent.mkdir(parents=True, exist_ok=True)
            handle = open(host, "wb")  # noqa: ASYNC230, SIM115 - local page cache; kept open across awaits
        except OSError as exc:
            error = f"{path}: {exc.strerror}"
    mtime = 0
    try:
        # the host streams DATA until DONE whatever happens; on error keep reading and discard
        while True:
            header = await io.read_exact(8)
            kind, value = header[:4], _U32.unpack_from(header, 4)[0]
            if kind == b"DONE":
                mtime = value
                break
            if kind != b"DATA":
                raise EOFError(f"unexpected {kind!r} in SEND")
            data = await io.read_exact(value)
            if handle is not None and error is None:
                try:
                    handle.write(data)
                except OSError as exc:
                    error = f"{path}: {exc.strerror}"
    finally:
        if handle is not None:
            handle.close()
    if error is not None or host is None:
        await io.fail(error or path)
        return
    # the mode travels in decimal (e.g. "33188" = regular file 0644)
    mode = stat.S_IMODE(int(mode_text)) if mode_text.isdigit() else 0o644
    os.chmod(host, mode or 0o644)
    if mtime:
        os.utime(host, (mtime, mtime))
    logger.debug("sync: received %s", path)
    await io.write(b"OKAY" + bytes(4))


async def _recv(io: _SyncIO, sandbox: Sandbox, path: str) -> None:
    host = _host_path(sandbox, path)
    try:
        if host is None:
            raise FileNotFoundError(path)
        handle = open(host, "rb")  # noqa: ASYNC230, SIM115 - as in _send
    except OSError as exc:
        await io.fail(f"{path}: {exc.strerror or 'no such file'}")
        return
    with handle:
        while chunk := handle.read(SYNC_DATA_MAX):
            await io.write(b"DATA" + _U32.pack(len(chunk)) + chunk)
    await io.write(b"DONE" + bytes(4))
