"""Clients that stop reading a stream: their phone is freed after ``write_timeout_s`` and their
connection dropped (server/api/sse.py, server/api/connection.py); the numbers for 100 such clients
are benchmarks/slow_clients.py's.

A client that stops reading is a socket with a small receive buffer that is never read: the kernel's
buffers fill, then the transport's, then a send waits.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import BASE_KNOBS, ServerThread, wait_ready

WRITE_TIMEOUT_S = 1.0
MAX_TOKENS = 1000
# fast enough that a stream fills every buffer in a few seconds, slow enough that it would hold its
# phone ~10 s more without the write timeout
KNOBS = {**BASE_KNOBS, "speed": 1, "decode_tps": 100.0, "prefill_factor": 0.01}


@pytest.fixture(scope="module")
def slow_server() -> Iterator[tuple[str, str]]:
    with SimLab(phones=1, speed=0, sim_config=KNOBS) as lab:
        settings = Settings(adb_servers=[lab.adb_server], sim=0, write_timeout_s=WRITE_TIMEOUT_S, sse_ping_s=60)
        with ServerThread(create_app(settings)) as st:
            base = f"http://127.0.0.1:{st.port}"
            yield base, wait_ready(base)


def phone(base: str) -> dict[str, Any]:
    [p] = httpx.get(base + "/v1/devices", timeout=5).json()["data"]
    return dict(p)


def open_unread_stream(base: str, body: dict[str, Any], path: str = "/v1/completions") -> socket.socket:
    """Send a streaming request and never read the answer (4 KiB receive buffer)."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} after {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_stream_nobody_reads_frees_its_phone_and_loses_its_connection(
    slow_server: tuple[str, str], caplog: pytest.LogCaptureFixture, path: str,
) -> None:
    base, model = slow_server
    served_before = phone(base)["tokens_served"]
    body: dict[str, Any] = {"model": model, "max_tokens": MAX_TOKENS, "stream": True, "ignore_eos": True}
    body |= {"prompt": "Go"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Go"}]}
    with caplog.at_level(logging.WARNING, logger="server.api.sse"):
        sock = open_unread_stream(base, body, path)
        try:
            wait_for(lambda: phone(base)["request_in_flight"] is not None, "busy")
            wait_for(lambda: phone(base)["state"] == "ready" and phone(base)["request_in_flight"] is None, "free")
            # freed by the write timeout, well before the phone could have generated every token
            assert phone(base)["tokens_served"] - served_before < MAX_TOKENS
            wait_for(lambda: any("took no data" in r.getMessage() for r in caplog.records), "logged")
            # the connection is gone: reading now gets what was buffered, then a reset or the end
            sock.settimeout(10)
            with pytest.raises((ConnectionResetError, EOFError)):
                while sock.recv(65536):
                    pass
                raise EOFError
        finally:
            sock.close()
    line = next(r.getMessage() for r in caplog.records if "took no data" in r.getMessage())
    assert "cancelled on its phone" in line and "dropped" in line


def test_a_stream_read_slowly_but_steadily_is_not_cut(slow_server: tuple[str, str]) -> None:
    """The timeout is for a client that takes nothing at all, not for one slower than the phone."""
    base, model = slow_server
    body = {"model": model, "prompt": "Go", "max_tokens": 150, "stream": True, "ignore_eos": True}
    data = []
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                data.append(line)
                if len(data) % 25 == 0:
                    time.sleep(WRITE_TIMEOUT_S / 2)
    assert data[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in data[-2]
