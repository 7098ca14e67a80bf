"""stage_phone: the device-protocol.md section 1 layout inside a phone sandbox."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from server.sim.simconfig import DEFAULTS, SimConfig, SimConfigWatcher, write_sim_config
from server.sim.staging import QNN_LIBS, stage_phone
from server.sim.vocab import ensure_tokenizer_json

ROOT = "data/local/tmp/wq"


def snapshot(sandbox: Path) -> dict[str, bytes]:
    return {str(p.relative_to(sandbox)): p.read_bytes() for p in sorted(sandbox.rglob("*")) if p.is_file()}


def test_layout_matches_the_device_protocol(tmp_path: Path) -> None:
    stage_phone(tmp_path, precision="both")
    wq = tmp_path / ROOT
    assert os.access(wq / "qhx_generate", os.X_OK)
    for lib in QNN_LIBS:
        assert (wq / lib).read_bytes().startswith(b"QHX-SIM PLACEHOLDER " + lib.encode())
    for bundle, decode in (("qwen35", "qwen3508b_decode_f16.bin"), ("qwen35-w8", "qwen3508b_decode_w8.bin")):
        names = {p.name for p in (wq / bundle).iterdir()}
        assert names == {"qwen3.5-0.8b-1024.json", decode, "qwen3508b_lmhead_f16.bin", "qwen3508b_embed_f16.bin",
                         "tokenizer.json"}
        for name in names - {"tokenizer.json", "qwen3.5-0.8b-1024.json"}:
            assert (wq / bundle / name).stat().st_size <= 8192
    assert not list(wq.glob("**/.*"))  # no temporary files left behind


def test_manifest_declares_the_bundle(tmp_path: Path) -> None:
    stage_phone(tmp_path, precision="w8")
    plan = json.loads((tmp_path / ROOT / "qwen35-w8" / "qwen3.5-0.8b-1024.json").read_text())
    assert (plan["family"], plan["precision"], plan["arch"], plan["soc_model"]) == ("qwen3.5-0.8b", "w8", "v81",
                                                                                      "SM8850")
    assert plan["max_context"] == 1024 and plan["graphs"]["decode"]["file"] == "qwen3508b_decode_w8.bin"
    assert not (tmp_path / ROOT / "qwen35").exists()


def test_tokenizer_is_hard_linked_from_the_cache(tmp_path: Path) -> None:
    stage_phone(tmp_path)
    assert os.path.samefile(tmp_path / ROOT / "qwen35" / "tokenizer.json", ensure_tokenizer_json())


def test_sim_json_and_props_json(tmp_path: Path) -> None:
    (tmp_path / "props.json").write_text(json.dumps({"ro.serialno": "keep-me", "ro.soc.model": "SM8850"}))
    stage_phone(tmp_path, soc="SM8750", props={"ro.product.model": "Pixel-ish"}, sim_config={"speed": "max"})
    assert json.loads((tmp_path / "sim.json").read_text()) == {**DEFAULTS, "speed": "max"}
    props = json.loads((tmp_path / "props.json").read_text())
    assert props["ro.soc.model"] == "SM8750" and props["ro.serialno"] == "keep-me"
    assert props["ro.product.model"] == "Pixel-ish" and props["ro.board.platform"] == "sun"


def test_staging_is_idempotent(tmp_path: Path) -> None:
    stage_phone(tmp_path, precision="both", sim_config={"speed": 0})
    before = snapshot(tmp_path)
    stage_phone(tmp_path, precision="both", sim_config={"speed": 0})
    assert snapshot(tmp_path) == before


def test_unknown_precision_or_knob_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        stage_phone(tmp_path, precision="w4")
    with pytest.raises(KeyError):
        stage_phone(tmp_path, sim_config={"sped": 2})
    with pytest.raises(ValueError):
        stage_phone(tmp_path, sim_config={"speed": "fast"})


def test_launcher_runs_the_runtime_from_the_sandbox_with_a_bare_env(tmp_path: Path) -> None:
    stage_phone(tmp_path)
    result = subprocess.run(["./qhx_generate"], cwd=tmp_path / ROOT, env={"PATH": "/usr/bin:/bin"},
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 2 and b"usage: qhx_generate" in result.stderr


def test_watcher_sees_changes_and_keeps_the_last_good_knobs(tmp_path: Path) -> None:
    stage_phone(tmp_path, sim_config={"speed": 0})
    watcher = SimConfigWatcher(tmp_path / "sim.json")
    assert watcher.current().speed == 0
    write_sim_config(tmp_path, {"hang": True})
    assert watcher.current().hang and watcher.current().speed == 0
    (tmp_path / "sim.json").write_text('{"hang": "sometimes"')  # half-written
    assert watcher.current().hang
    (tmp_path / "sim.json").unlink()
    assert watcher.current() == SimConfig()
