"""Helpers of the API tests: a live uvicorn server in a thread and a handle on it.

Test modules import these from here (``from live_server import ...``), not from ``conftest``: several
test folders have a conftest.py and the module name ``conftest`` is ambiguous when they are
collected together.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Self

import httpx
import openai
import uvicorn

from server.settings import Settings
from server.sim.harness import SimPhone

BASE_KNOBS: dict[str, Any] = {"speed": 0, "stop_rate": 0.0, "load_s": 0.0}


class OpenAIClients:
    """The official clients for a server at ``base_url`` (the subclass declares ``base_url`` and
    ``_client``)."""

    base_url: str
    _client: openai.OpenAI | None

    def client(self) -> openai.OpenAI:
        """The session's sync client (one connection pool, closed at the end)."""
        if self._client is None:
            self._client = openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0)
        return self._client

    def async_client(self, **kw: Any) -> openai.AsyncOpenAI:
        """A new async client for the calling test's event loop: use ``async with``."""
        return openai.AsyncOpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, **kw)


@dataclass
class LiveServer(OpenAIClients):
    base_url: str  # http://127.0.0.1:PORT
    model: str
    phone: SimPhone
    settings: Settings
    _client: openai.OpenAI | None = None

    def devices(self) -> list[dict[str, Any]]:
        return httpx.get(self.base_url + "/v1/devices", timeout=5).json()["data"]

    def wait_idle(self, timeout: float = 1.0) -> float:
        """Seconds until the phone is ready with no request in flight (fails after ``timeout``)."""
        t0 = time.monotonic()
        while True:
            phones = self.devices()
            if all(p["state"] == "ready" and p["request_in_flight"] is None for p in phones):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"phone still busy after {timeout} s: {phones}")
            time.sleep(0.01)


class ServerThread:
    """uvicorn serving ``app`` on an already bound loopback socket, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        # proto IPPROTO_TCP, as uvicorn's own sockets: asyncio turns Nagle off (TCP_NODELAY) only on
        # sockets that say so, and with Nagle every keep-alive response waited ~40 ms for a delayed ACK
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", ws="none", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


def wait_ready(base_url: str, timeout: float = 60.0) -> str:
    """Wait for /ready and the model's tokenizer; returns the served model name."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(base_url + "/ready", timeout=5).status_code == 200:
            model = httpx.get(base_url + "/v1/models", timeout=5).json()["data"][0]["id"]
            # first completion pays the tokenizer load (unless the warm-up already did)
            httpx.post(base_url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1},
                       timeout=60).raise_for_status()
            return str(model)
        time.sleep(0.05)
    raise RuntimeError("server never became ready")
