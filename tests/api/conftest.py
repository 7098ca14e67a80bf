"""The real stack for API tests: official openai client -> uvicorn on 127.0.0.1 -> create_app ->
build_backend (adb fleet + pool) -> a private real adb server -> simulated phones (SimLab).

One lab and one server for the session (start ~3 s: the tokenizer load). The phone runs at speed 0
(no simulated delays) and with no natural stop (``stop_rate`` 0) unless a test changes its knobs
with ``phone_knobs``, which restores them afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from server.api.app import create_app
from server.serving.tokens import HostTokenizer
from server.settings import Settings
from server.sim.harness import SimLab
from server.sim.vocab import ensure_tokenizer_json
from tests.api.live_server import BASE_KNOBS, LiveServer, ServerThread, wait_ready


@pytest.fixture(scope="session")
def api_lab() -> Iterator[SimLab]:
    with SimLab(phones=1, speed=0, sim_config=BASE_KNOBS) as lab:
        yield lab


@pytest.fixture(scope="session")
def live(api_lab: SimLab) -> Iterator[LiveServer]:
    # crash tests fail the one phone several times in a row: keep its quarantine short
    settings = Settings(adb_servers=[api_lab.adb_server], sim=0, sse_ping_s=0.25, max_queue=1, quarantine_s=0.5,
                        quarantine_max_s=1.0)
    with ServerThread(create_app(settings)) as st:
        base = f"http://127.0.0.1:{st.port}"
        server = LiveServer(base, wait_ready(base), api_lab.phones[0], settings)
        yield server
        if server._client is not None:
            server._client.close()


@pytest.fixture
def phone_knobs(live: LiveServer) -> Iterator[Any]:
    """``phone_knobs(speed=1, ...)`` for one test; the base knobs come back afterwards."""

    def set_knobs(**knobs: Any) -> None:
        live.phone.configure(**knobs)

    yield set_knobs
    live.phone.configure(**BASE_KNOBS, slow_first_token_s=0.0, crash_after=None, hang=False)
    live.wait_idle(timeout=10)


@pytest.fixture(scope="session")
def tokenizer() -> HostTokenizer:
    return HostTokenizer.from_file(ensure_tokenizer_json())
