"""Test helpers: run the simulated ``qhx_generate`` in a staged sandbox, as the phone's shell would.

The runtime is started through the staged launcher with cwd = ``<sandbox>/data/local/tmp/wq`` and
``QHX_SIM_SANDBOX`` set, exactly as the simulated adbd runs it (minus adb itself). tests/sim/adb_session.py
speaks the same protocol to a phone through the real adb server.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from server.sim.staging import DEVICE_ROOT

MANIFEST = "qwen3.5-0.8b-1024.json"
IM_END = 248046
ENDOFTEXT = 248044


def wq(sandbox: Path) -> Path:
    """The device root inside a sandbox."""
    return sandbox / DEVICE_ROOT


def phone_env(sandbox: Path) -> dict[str, str]:
    """The environment the simulated adbd gives phone commands (the parts the runtime needs)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "QHX_SIM_SANDBOX": str(sandbox),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LD_LIBRARY_PATH": ".",
    }


def cli_args(bundle: str = "qwen35", max_new: int = 1024, prompt: str = "-") -> list[str]:
    """The model card's argument order."""
    return [f"{bundle}/{MANIFEST}", "libQnnHtp.so", "libQnnSystem.so", bundle, str(max_new), prompt]


def run_cli(sandbox: Path, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run ``./qhx_generate <args>`` to completion (one-shot mode, or session with stdin closed)."""
    return subprocess.run(["./qhx_generate", *args], cwd=wq(sandbox), env=phone_env(sandbox),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)


class ProtocolClient:
    """The host end of a session: request lines out, events back parsed with their arrival time.

    Subclasses own the transport: they implement :meth:`send_raw` and feed stdout lines (None at
    EOF) into ``self._lines`` and stderr bytes into ``self.stderr``.
    """

    def __init__(self) -> None:
        self._lines: queue.Queue[tuple[float, bytes | None]] = queue.Queue()
        self.stderr = bytearray()

    def send_raw(self, line: bytes) -> float:
        """Send bytes as they are; returns the send time (monotonic)."""
        raise NotImplementedError

    def send(self, **msg: Any) -> float:
        """Send one request line; returns the send time (monotonic)."""
        return self.send_raw((json.dumps(msg) + "\n").encode())

    def recv_raw(self, timeout: float = 30.0) -> tuple[float, bytes | None]:
        """Next stdout line (None at EOF) and when it arrived."""
        return self._lines.get(timeout=timeout)

    def recv(self, timeout: float = 30.0) -> dict[str, Any]:
        """Next event, parsed; fails on EOF or a non-JSON line."""
        _, line = self.recv_raw(timeout)
        assert line is not None, f"runtime exited: {bytes(self.stderr).decode(errors='replace')}"
        return json.loads(line)

    def recv_timed(self, timeout: float = 30.0) -> tuple[float, dict[str, Any]]:
        t, line = self.recv_raw(timeout)
        assert line is not None, f"runtime exited: {bytes(self.stderr).decode(errors='replace')}"
        return t, json.loads(line)

    def quiet(self, seconds: float) -> bool:
        """True if nothing arrives on stdout for ``seconds``."""
        try:
            item = self._lines.get(timeout=seconds)
        except queue.Empty:
            return True
        self._lines.put(item)  # not expected by the caller; keep it visible for later asserts
        return False

    def until(self, ev: str, request_id: str | None = None, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Events up to and including the first ``ev`` (for ``request_id`` if given)."""
        events = []
        deadline = time.monotonic() + timeout
        while True:
            event = self.recv(timeout=max(0.01, deadline - time.monotonic()))
            events.append(event)
            if event.get("ev") == ev and (request_id is None or event.get("id") == request_id):
                return events

    def generate(self, request_id: str, prompt_ids: list[int], max_new: int, **fields: Any) -> list[dict[str, Any]]:
        """Send a generate and collect its events up to ``done`` (or its ``error``)."""
        self.send(op="generate", id=request_id, prompt_ids=prompt_ids, max_new=max_new, **fields)
        events = []
        while True:
            event = self.recv()
            if event.get("id") != request_id:
                raise AssertionError(f"unexpected event {event}")
            events.append(event)
            if event["ev"] in ("done", "error"):
                return events


class RuntimeSession(ProtocolClient):
    """A session-mode runtime process with reader threads (no adb in between)."""

    def __init__(self, sandbox: Path, *, bundle: str = "qwen35", max_new: int = 1024) -> None:
        super().__init__()
        self.proc = subprocess.Popen(["./qhx_generate", *cli_args(bundle, max_new)], cwd=wq(sandbox),
                                     env=phone_env(sandbox), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put((time.monotonic(), line))
        self._lines.put((time.monotonic(), None))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for chunk in self.proc.stderr:
            self.stderr += chunk

    def send_raw(self, line: bytes) -> float:
        assert self.proc.stdin is not None
        t = time.monotonic()
        self.proc.stdin.write(line)
        self.proc.stdin.flush()
        return t

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for exit and for the readers to drain; returns the exit code."""
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(timeout)
        return code

    def kill(self) -> None:
        """Stop the process (if still running) and release its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.close_stdin()
        self.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def toks(events: list[dict[str, Any]]) -> list[int]:
    """All generated ids of a request's events."""
    return [i for e in events if e["ev"] == "tok" for i in e["ids"]]
