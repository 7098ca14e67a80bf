"""Test helper: the session protocol spoken to a simulated phone through the real adb server.

Opens a ``shell,v2,raw:`` stream (as the adb backend does) running the session command in the device
root, and feeds its stdout lines to :class:`ProtocolClient`. Closing the stream kills the phone's
process group: a restart is a new :class:`AdbSession`.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from typing import Any

import adbutils

from server.sim.staging import DEVICE_ROOT
from tests.sim.runtime_proc import ProtocolClient, cli_args

STDIN, STDOUT, STDERR, EXIT, CLOSE_STDIN = 0, 1, 2, 3, 4  # shell protocol v2 packet ids


def v2_packet(packet_id: int, data: bytes = b"") -> bytes:
    return struct.pack("<BI", packet_id, len(data)) + data


def session_command(bundle: str = "qwen35", max_new: int = 1024) -> str:
    """The session launch line (device-protocol.md section 3): the model card line with ``-``."""
    return f"cd /{DEVICE_ROOT} && LD_LIBRARY_PATH=. ./qhx_generate " + " ".join(cli_args(bundle, max_new))


class AdbSession(ProtocolClient):
    """A session-mode runtime on ``serial``, reached through the adb server on ``adb_port``."""

    def __init__(self, adb_port: int, serial: str, *, bundle: str = "qwen35", max_new: int = 1024) -> None:
        super().__init__()
        device = adbutils.AdbClient(host="127.0.0.1", port=adb_port, socket_timeout=10).device(serial)
        self._conn = device.open_transport(timeout=10)
        self._conn.send_command("shell,v2,raw:" + session_command(bundle, max_new))
        self._conn.check_okay()
        self._conn.conn.settimeout(None)  # the reader blocks as long as the session lives
        self._send_lock = threading.Lock()
        self.exit_code: int | None = None
        self.ready: dict[str, Any] = {}  # the `ready` event, once a caller has read it
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        pending = b""
        try:
            while True:
                packet_id, length = struct.unpack("<BI", self._conn.read_exact(5))
                data = self._conn.read_exact(length) if length else b""
                if packet_id == STDOUT:
                    pending += data
                    *lines, pending = pending.split(b"\n")
                    now = time.monotonic()
                    for line in lines:
                        self._lines.put((now, line + b"\n"))
                elif packet_id == STDERR:
                    self.stderr += data
                elif packet_id == EXIT:
                    self.exit_code = data[0]
                    break
        except (OSError, EOFError, adbutils.AdbError):
            pass  # stream closed
        self._lines.put((time.monotonic(), None))

    def send_raw(self, line: bytes) -> float:
        t = time.monotonic()
        with self._send_lock:
            self._conn.send(v2_packet(STDIN, line))
        return t

    def close_stdin(self) -> None:
        """EOF on the runtime's stdin: it finishes (cancelling a running request) and exits 0."""
        with self._send_lock:
            self._conn.send(v2_packet(CLOSE_STDIN))

    def wait(self, timeout: float = 30.0) -> int | None:
        """Wait for the exit packet; returns the exit code (None if the stream ended without one)."""
        self._reader.join(timeout)
        return self.exit_code

    def kill(self) -> None:
        """End the session: EOF on stdin and wait for the exit (bounded), then close the stream.

        Closing the stream alone also ends it (the simulated adbd kills the process group), but
        asynchronously: a phone stopped right after could be left with the process's pipes open.
        """
        if self._reader.is_alive():
            with contextlib.suppress(OSError):
                self.close_stdin()
            self._reader.join(10)
        self._conn.close()
        self._reader.join(10)
