"""scripts/health_plot.py: samples a live server's phones (a real server on a simulated phone) and plots
them; a server that does not answer skips samples, a line cut short is skipped when reading."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import BASE_KNOBS, ServerThread, wait_ready

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "health_plot.py"


@pytest.fixture(scope="module")
def health_plot() -> ModuleType:
    spec = importlib.util.spec_from_file_location("health_plot", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["health_plot"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with SimLab(phones=1, speed=0, sim_config=BASE_KNOBS) as lab:
        lab.phones[0].configure(temp_c=36.5)
        settings = Settings(adb_servers=[lab.adb_server], sim=0, telemetry_poll_s=0.1)
        with ServerThread(create_app(settings)) as st:
            base = f"http://127.0.0.1:{st.port}"
            wait_ready(base)
            yield base


def test_samples_of_a_live_server_make_a_plot(health_plot: ModuleType, server: str, tmp_path: Path) -> None:
    out = tmp_path / "run.jsonl"
    assert health_plot.sample(server, out, every=0.05, duration=0.5) >= 2
    samples = health_plot.read_samples(out)
    phone = samples[-1]["phones"][0]
    assert phone["temperature_c"] == 36.5 and phone["thermal_status"] == 0 and phone["busy"] is False
    assert samples[-1]["waiting"] == {"qwen3.5-0.8b": 0.0}
    png = tmp_path / "run.png"
    assert health_plot.main(["plot", str(out), "--out", str(png), "--title", "test"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_server_that_does_not_answer_skips_samples_and_a_cut_line_is_skipped(
        health_plot: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    out = tmp_path / "none.jsonl"
    assert health_plot.sample(f"http://127.0.0.1:{dead}", out, every=0.05, duration=0.2) == 0
    assert "sample skipped" in capsys.readouterr().err
    good = {"t": 1.0, "waiting": {}, "phones": [{"serial": "a", "busy": True, "decode_tps": 20.0,
                                                  "temperature_c": 40.0, "drained": "thermal"}]}
    out.write_text(json.dumps(good) + "\n" + json.dumps(good)[:20])
    assert health_plot.read_samples(out) == [good]
    assert health_plot.series([good], "decode_tps") == {"a": ([0.0], [20.0])}


def test_a_samples_file_with_phones_coming_and_going_and_junk_still_plots(
        health_plot: ModuleType, tmp_path: Path) -> None:
    # before: a line that is JSON but not a sample (null) crashed the plot (TypeError), so did a file
    # with a byte that is not UTF-8 (UnicodeDecodeError) and a value that is not a number; and a phone
    # that went away and came back had its line drawn straight across its absence
    a = {"serial": "a", "busy": True, "decode_tps": 20.0, "temperature_c": 40.0, "drained": None}
    lines = [json.dumps({"t": 0.0, "waiting": {"m": 1}, "phones": [a]}), "null", "[1, 2]", '{"t": "x"}',
             json.dumps({"t": 60.0, "waiting": {}, "phones": []}),  # a unplugged
             json.dumps({"t": 120.0, "phones": [{**a, "decode_tps": "fast", "drained": "thermal"},
                                                 {"serial": "b", "busy": False}]})]
    out = tmp_path / "odd.jsonl"
    out.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe junk\n")
    samples = health_plot.read_samples(out)
    assert [s["t"] for s in samples] == [0.0, 60.0, 120.0]
    assert health_plot.series(samples, "temperature_c") == {"a": ([0.0, 1.0, 2.0], [40.0, None, 40.0]),
                                                            "b": ([0.0, 1.0, 2.0], [None, None, None])}
    png = tmp_path / "odd.png"
    assert health_plot.main(["plot", str(out), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
