"""`qhx-server devices`: the phones of the adb servers, straight from adb, no server running."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.backends.base import PhoneHealth
from server.cli import main
from server.ops.devices import print_devices
from server.settings import Settings
from server.sim.harness import SimLab


@pytest.fixture(scope="module")
def lab() -> Iterator[SimLab]:
    with SimLab(phones=0, speed=0) as lab:
        yield lab


@pytest.fixture(scope="module")
def tok_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


def backend_settings(lab: SimLab, cache: Path, **overrides: Any) -> Settings:
    """Settings for the phones of ``lab`` (the report never waits long for an adb server)."""
    values: dict[str, Any] = {"adb_servers": [lab.adb_server], "tokenizer_cache": str(cache), "adb_timeout_s": 5.0}
    return Settings(**{**values, **overrides})


def test_devices_shows_each_phone_its_bundles_and_what_it_would_serve(
    lab: SimLab, tok_cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    both = lab.add_phone(precision="both")
    w8_by_choice = lab.add_phone(precision="both")
    other_soc = lab.add_phone(soc="SM8650")
    settings = backend_settings(lab, tok_cache, bundle_for=[f"{w8_by_choice.serial}=qwen35-w8"])
    assert print_devices(settings) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[both.serial].split()[4:7] == ["qwen35*,qwen35-w8", "qwen3.5-0.8b", "(simulated)"]
    assert rows[w8_by_choice.serial].split()[4:6] == ["qwen35,qwen35-w8*", "qwen3.5-0.8b-w8"]
    assert "ready" in rows[both.serial]
    assert "incompatible" in rows[other_soc.serial] and "SM8650 (Hexagon v75)" in rows[other_soc.serial]


def test_devices_json_has_the_fields_of_v1_devices(lab: SimLab, tok_cache: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    sim = lab.add_phone()
    assert main(["devices", "--adb-server", lab.adb_server, "--tokenizer-cache", str(tok_cache), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)["data"]
    [row] = [d for d in data if d["serial"] == sim.serial]
    assert set(row) == {f.name for f in dataclasses.fields(PhoneHealth)}
    assert row["state"] == "ready" and row["model"] == "qwen3.5-0.8b" and row["adb_server"] == lab.adb_server
    assert row["soc"] == "SM8850" and row["bundle"] == "qwen35" and row["simulated"] is True


def test_devices_fails_when_no_adb_server_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    assert print_devices(Settings(adb_servers=[f"127.0.0.1:{dead}"], adb_timeout_s=2)) == 1
    assert "adb server unreachable: 127.0.0.1:" in capsys.readouterr().err
