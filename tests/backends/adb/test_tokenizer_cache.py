"""A bundle's own chat template reaches the host cache next to its tokenizer (real adb, simulated phones)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from server.backends.adb.discovery import discover
from server.backends.adb.tokenizer_cache import folder_key, parse_listing
from server.backends.adb.transport import AdbServerClient
from server.settings import Settings
from server.sim.harness import SimLab, SimPhone
from tests.backends.adb_helpers import backend_settings

BUNDLE = "/data/local/tmp/wq/qwen35"


async def _tokenizer_path(lab: SimLab, sim: SimPhone, settings: Settings) -> tuple[Path, str]:
    client = AdbServerClient(lab.adb_server, timeout=settings.adb_timeout_s)
    facts = await discover(client, sim.serial, settings)
    assert facts.problem is None and facts.model is not None
    return Path(facts.model.tokenizer_path), facts.model.tokenizer_sha256


async def _new_phone(lab: SimLab, **files: str) -> SimPhone:
    sim = await asyncio.to_thread(lab.add_phone)
    for name, text in files.items():
        sim.phone_path(f"{BUNDLE}/{name}").write_text(text, encoding="utf-8")
    return sim


async def test_bundle_template_is_cached_beside_its_tokenizer(lab: SimLab, tmp_path: Path) -> None:
    settings = backend_settings(lab, tmp_path)
    template = "SYSTEM-FROM-BUNDLE {{ messages }}"
    sim = await _new_phone(lab, **{"chat_template.jinja": template})
    path, sha = await _tokenizer_path(lab, sim, settings)
    plain = tmp_path / sha / "tokenizer.json"
    assert path.name == "tokenizer.json" and path.parent != plain.parent
    assert (path.parent / "chat_template.jinja").read_text(encoding="utf-8") == template
    assert os.path.samefile(path, plain)  # a hard link of the tokenizer, which keeps its own sha
    before = path.stat().st_mtime_ns, (path.parent / "chat_template.jinja").stat().st_mtime_ns
    again, _ = await _tokenizer_path(lab, sim, settings)
    assert again == path
    assert (path.stat().st_mtime_ns, (path.parent / "chat_template.jinja").stat().st_mtime_ns) == before


async def test_bundle_without_template_keeps_the_plain_sha_folder(lab: SimLab, tmp_path: Path) -> None:
    sim = await _new_phone(lab)
    path, sha = await _tokenizer_path(lab, sim, backend_settings(lab, tmp_path))
    assert path == tmp_path / sha / "tokenizer.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]


async def test_same_tokenizer_different_templates_get_different_folders(lab: SimLab, tmp_path: Path) -> None:
    settings = backend_settings(lab, tmp_path)
    a = await _new_phone(lab, **{"chat_template.jinja": "A {{ messages }}"})
    b = await _new_phone(lab, **{"tokenizer_config.json": '{"chat_template": "B {{ messages }}"}'})
    (path_a, sha_a), (path_b, sha_b) = await asyncio.gather(
        _tokenizer_path(lab, a, settings), _tokenizer_path(lab, b, settings)
    )
    assert sha_a == sha_b and path_a.parent != path_b.parent
    assert (path_a.parent / "chat_template.jinja").read_text(encoding="utf-8") == "A {{ messages }}"
    assert not (path_a.parent / "tokenizer_config.json").exists()
    assert "B {{ messages }}" in (path_b.parent / "tokenizer_config.json").read_text(encoding="utf-8")
    assert not (path_b.parent / "chat_template.jinja").exists()
    assert path_a.read_bytes() == path_b.read_bytes()  # concurrent pulls: equal, maybe not one inode


def test_folder_key_is_the_tokenizer_sha_only_without_templates() -> None:
    tok, tpl = "a" * 64, "b" * 64
    assert folder_key(tok, {}) == tok
    assert folder_key(tok, {"chat_template.jinja": tpl}) not in (tok, folder_key(tok, {"tokenizer_config.json": tpl}))


def test_listing_reads_presence_and_hashes_from_any_path_form() -> None:
    text = f"has:tokenizer.json\nhas:chat_template.jinja\n{'C' * 64}  /x/data/qwen35/chat_template.jinja\nnoise\n"
    assert parse_listing(text) == ({"tokenizer.json", "chat_template.jinja"}, {"chat_template.jinja": "c" * 64})
