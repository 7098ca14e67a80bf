"""One model served by the in-process phone double, for unit tests of the serving services.

The services need a :class:`~server.serving.models.ModelRegistry` (model resolution, the real
Qwen3.5 tokenizer, ~2 s to load) and a ``Backend`` (generation, and ``health()`` for one-shot
checks). :class:`ServedModel` is that backend: each test puts in its own phone double
(inprocess_phone_double.py), context size and mode, while the registry over it is built once per
session (fixtures ``served`` and ``registry`` in conftest.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from server.backends.base import Backend, Event, GenerationParams, ModelInfo, PhoneHealth
from server.sim.vocab import ensure_tokenizer_json
from tests.serving.inprocess_phone_double import InProcessPhoneDouble

MODEL = "qwen3.5-0.8b"


class ServedModel(Backend):
    """:data:`MODEL` with context ``max_context``, served by ``phone`` in ``mode``."""

    def __init__(self) -> None:
        self.phone = InProcessPhoneDouble([])
        self.max_context = 1024
        self.mode = "session"
        self.requests: list[str] = []  # ids of the phone requests made since the last reset

    def reset(self, phone: InProcessPhoneDouble | None = None, *, max_context: int = 1024,
              mode: str = "session") -> InProcessPhoneDouble:
        """A fresh phone (one that generates nothing unless given) for the next test; returns it."""
        self.phone = phone if phone is not None else InProcessPhoneDouble([])
        self.max_context, self.mode = max_context, mode
        self.requests = []
        return self.phone

    def generate(self, params: GenerationParams) -> AsyncIterator[Event]:
        self.requests.append(params.request_id)
        return self.phone.generate(params)

    async def cancel(self, request_id: str) -> None:
        await self.phone.cancel(request_id)

    def models(self) -> list[ModelInfo]:
        path = str(ensure_tokenizer_json())
        return [ModelInfo(MODEL, "fp16", self.max_context, path, "", phones=["double-1"], simulated=True)]

    def health(self) -> list[PhoneHealth]:
        return [dataclasses.replace(h, model=MODEL, mode=self.mode) for h in self.phone.health()]

    async def aclose(self) -> None:
        await self.phone.aclose()
