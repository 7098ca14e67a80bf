"""Pure quoting and launch-template tests (the end-to-end proof with a real shell is in
test_oneshot.py)."""

from __future__ import annotations

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.backends.adb.quoting import render_launch, sh_quote
from server.errors import InvalidRequest
from server.settings import DEFAULT_LAUNCH


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("qwen35", "qwen35"),
        ("qwen35/qwen3.5-0.8b-1024.json", "qwen35/qwen3.5-0.8b-1024.json"),
        ("-", "-"),
        ("", "''"),
        ("a b", "'a b'"),
        ("it's", "'it'\\''s'"),
        ("$(touch x)", "'$(touch x)'"),
        ("~", "'~'"),
    ],
)
def test_sh_quote_examples(value: str, quoted: str) -> None:
    assert sh_quote(value) == quoted


def test_sh_quote_refuses_nul() -> None:
    with pytest.raises(InvalidRequest):
        sh_quote("a\x00b")


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\x00", codec="utf-8")))
def test_sh_quote_round_trips_through_a_real_sh(text: str) -> None:
    # the host's /bin/sh is POSIX like the phone's mksh for single quotes
    out = subprocess.run(["sh", "-c", "printf %s " + sh_quote(text)], capture_output=True, check=True).stdout
    assert out == text.encode()


def test_render_launch_fills_the_model_card_command() -> None:
    cmd = render_launch(
        DEFAULT_LAUNCH,
        root="/data/local/tmp/wq",
        manifest="qwen35/qwen3.5-0.8b-1024.json",
        artifacts="qwen35",
        max_new=64,
        prompt="The capital of France is",
    )
    assert cmd == (
        "cd /data/local/tmp/wq && LD_LIBRARY_PATH=. ./qhx_generate qwen35/qwen3.5-0.8b-1024.json "
        "libQnnHtp.so libQnnSystem.so qwen35 64 'The capital of France is'"
    )


def test_render_launch_substitutes_once_and_leaves_other_braces() -> None:
    cmd = render_launch(
        "X=${HOME} {root} {prompt} {prompt}",
        root="/r",
        manifest="m",
        artifacts="a",
        max_new=1,
        prompt="{root}",
    )
    assert cmd == "X=${HOME} /r '{root}' '{root}'"


def test_render_launch_needs_every_value() -> None:
    with pytest.raises(ValueError, match="prompt"):
        render_launch(DEFAULT_LAUNCH, root="/r", manifest="m", artifacts="a", max_new=1)  # type: ignore[call-arg]
