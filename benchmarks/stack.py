"""The deployed shape for benchmarks: ``qhx-server sim`` (N phones at the real rate, behind their
private adb server) and ``qhx-server serve`` as subprocesses, plus the /proc readings the scripts
report. Shared by api_stream.py and pool_load.py."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Self

import httpx

from server.sim.cli import read_banner
from server.sim.simconfig import write_sim_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_info() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("openai", "fastapi", "uvicorn", "sse-starlette"))
    return (f"{platform.platform()}; {cpu}; {os.cpu_count()} cores; Python {platform.python_version()}; "
            f"{versions}")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stack:
    """``qhx-server sim`` (``phones`` phones, speed 1, no natural stop) + ``qhx-server serve``.

    On entry every phone is ready and one warm-up request has run; ``knobs(...)`` sets simulated
    phone knobs (sim.json) on every phone."""

    def __init__(self, workdir: Path, phones: int = 1, *, ready_timeout_s: float = 180.0,
                 serve_args: list[str] | None = None, sim_args: list[str] | None = None,
                 serve_log: Path | None = None) -> None:
        self.workdir, self.n, self.ready_timeout_s = workdir, phones, ready_timeout_s
        self.serve_log = serve_log  # the server's stderr (its log) goes there, else to ours
        self.serve_args = list(serve_args or [])  # extra `qhx-server serve` options, e.g. --state-reuse off
        self.sim_args = list(sim_args or [])  # extra `qhx-server sim` options, e.g. --checkpoints 0
        self.sim: subprocess.Popen[str] | None = None
        self.srv: subprocess.Popen[str] | None = None
        self.sandboxes: list[Path] = []
        self.base_url = ""
        self.model = ""

    def __enter__(self) -> Self:
        py = sys.executable
        self.sim = subprocess.Popen(
            [py, "-m", "server.cli", "sim", "--phones", str(self.n), "--speed", "1", "--workdir",
             str(self.workdir), "--log-level", "warning", *self.sim_args], stdout=subprocess.PIPE, text=True,
        )
        assert self.sim.stdout is not None
        adb_server, self.sandboxes = read_banner(self.sim.stdout)
        if adb_server is None or len(self.sandboxes) != self.n:
            raise RuntimeError("qhx-server sim did not start")
        self.knobs(stop_rate=0.0)  # no natural end: every request runs to max_tokens
        port = free_port()
        log = open(self.serve_log, "w") if self.serve_log is not None else None
        self.srv = subprocess.Popen(
            [py, "-m", "server.cli", "serve", "--sim", "0", "--adb-server", adb_server, "--port", str(port),
             "--log-level", "warning", *self.serve_args], stderr=log,
        )
        if log is not None:
            log.close()  # the child has its own copy
        self.base_url = f"http://127.0.0.1:{port}"
        self._wait_ready()
        return self

    @property
    def sandbox(self) -> Path:
        """The first phone's sandbox (single-phone benchmarks)."""
        return self.sandboxes[0]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            try:
                phones = self.devices()
                if len(phones) == self.n and all(p["state"] == "ready" for p in phones):
                    self.model = httpx.get(self.base_url + "/v1/models").json()["data"][0]["id"]
                    httpx.post(self.base_url + "/v1/completions", timeout=120,
                               json={"model": self.model, "prompt": "hi", "max_tokens": 1}).raise_for_status()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready")

    def knobs(self, **knobs: Any) -> None:
        for sandbox in self.sandboxes:
            write_sim_config(sandbox, knobs)

    def devices(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.base_url + "/v1/devices", timeout=5).json()["data"])

    def __exit__(self, *exc: object) -> None:
        for proc in (self.srv, self.sim):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
