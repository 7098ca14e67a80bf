"""`qhx-server serve`'s choice of phones (server/serve.py): real ones, or simulated when asked."""

from __future__ import annotations

import socket

import pytest

from server.serve import simulated_phones
from server.settings import Settings


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("servers", [1, 2])
def test_auto_never_replaces_the_adb_servers_the_operator_named(servers: int) -> None:
    """`--adb-server phones.lan:5037` with that host down at start-up (a reboot, a network blip) served
    ONE SIMULATED phone in its place for the server's whole life: simulated tokens with 200s to real
    clients, and the named adb server never polled again. Auto (sim -1) simulates only when no adb
    server is named; named ones are polled until their phones come (issue 10, settings)."""
    named = [f"127.0.0.1:{unused_port()}" for _ in range(servers)]  # nobody listens there
    settings = Settings(adb_servers=named, sim=-1)
    with simulated_phones(settings) as effective:
        assert effective.adb_servers == named and effective.sim == -1


def test_auto_with_no_adb_server_named_and_no_phone_serves_one_simulated_phone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADB_SERVER_SOCKET", f"tcp:127.0.0.1:{unused_port()}")  # the local one: nobody there
    with simulated_phones(Settings(sim=-1)) as effective:
        assert len(effective.adb_servers) == 1
        host, _, port = effective.adb_servers[0].rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5):  # the private adb server runs
            pass
