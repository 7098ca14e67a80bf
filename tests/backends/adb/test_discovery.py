"""Bundle listing, model identity, bundle choice and the arch check (pure)."""

from __future__ import annotations

import pytest

from server.backends.adb.discovery import (
    Incompatible,
    arch_mismatch,
    choose_bundle,
    model_identity,
    parse_bundles,
    parse_props,
)
from server.settings import Settings

LISTING = [
    "qwen35/qwen3.5-0.8b-1024.json",
    "qwen35/tokenizer.json",
    "qwen35/qwen3508b_decode_f16.bin",
    "qwen35/qwen3508b_lmhead_f16.bin",
    "qwen35-w8/qwen3.5-0.8b-1024.json",
    "qwen35-w8/tokenizer.json",
    "qwen35-w8/qwen3508b_decode_w8.bin",
    "notabundle/tokenizer.json",
    "notabundle/config.json",
]


def test_bundles_are_dirs_with_a_family_context_manifest() -> None:
    bundles = parse_bundles(LISTING)
    assert [(b.name, b.manifest, b.family, b.context, b.precision) for b in bundles] == [
        ("qwen35", "qwen3.5-0.8b-1024.json", "qwen3.5-0.8b", 1024, "fp16"),
        ("qwen35-w8", "qwen3.5-0.8b-1024.json", "qwen3.5-0.8b", 1024, "w8"),
    ]
    assert bundles[0].manifest_path == "qwen35/qwen3.5-0.8b-1024.json"


def test_model_identity_follows_the_protocol_and_settings_override_it() -> None:
    fp16, w8 = parse_bundles(LISTING)
    assert model_identity(fp16, Settings()) == ("qwen3.5-0.8b", 1024)
    assert model_identity(w8, Settings()) == ("qwen3.5-0.8b-w8", 1024)
    assert model_identity(w8, Settings(model_name="mine", max_context=512)) == ("mine", 512)


def test_bundle_choice_prefers_setting_then_fp16_then_first() -> None:
    bundles = parse_bundles(LISTING)
    assert choose_bundle(bundles, None).name == "qwen35"
    assert choose_bundle(bundles, "qwen35-w8").name == "qwen35-w8"
    assert choose_bundle(bundles[1:], None).name == "qwen35-w8"
    with pytest.raises(Incompatible, match="not on the phone"):
        choose_bundle(bundles, "qwen99")
    with pytest.raises(Incompatible, match="no model bundle"):
        choose_bundle([], None)


V81 = {"arch": "v81", "soc_model": "SM8850"}


def test_arch_check_accepts_the_matching_soc() -> None:
    assert arch_mismatch(V81, "SM8850") is None
    assert arch_mismatch({}, "SM8650") is None  # a manifest that says nothing is the runtime's problem


def test_arch_check_explains_a_mismatch() -> None:
    why = arch_mismatch(V81, "SM8650")
    assert why is not None and "v81" in why and "SM8650" in why and "v75" in why
    assert "unknown SoC" in (arch_mismatch(V81, "QCM6490") or "")
    assert "no ro.soc.model" in (arch_mismatch(V81, None) or "")
    assert arch_mismatch({"soc_model": "SM8850"}, "SM8850") is None


def test_props_parsing_reads_getprop_output() -> None:
    text = "[ro.product.model]: [Pixel 9]\n[ro.soc.model]: [SM8850]\n[ro.qhx.simulated]: []\nnoise\n"
    assert parse_props(text) == {
        "ro.product.model": "Pixel 9",
        "ro.soc.model": "SM8850",
        "ro.qhx.simulated": "",
    }
