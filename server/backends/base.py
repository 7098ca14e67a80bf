"""The backend contract: what the serving and scheduling layers need from phones.

In the spirit of vLLM's ``EngineClient`` and httpx's transport: a tiny async interface.

``Backend.generate(params)`` yields typed events for one request, in order::

    Started  -> Tokens* -> Finished

and raises a :class:`server.errors.BackendError` subclass when the phone fails (the "error" event of
the contract is the exception, so that ``async for`` consumers cannot forget it). Closing the iterator
early (``aclose()``, or the consuming task being cancelled) cancels the request on the phone and waits,
bounded, for the phone's ``done`` so that the phone is reusable right after.

A single phone (``server.backends.adb.phone.Phone``) and the pool of phones
(``server.scheduling.pool.PhonePool``) both implement this contract; the API layer only ever sees a
``Backend``.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class Boundary:
    """A point in a prompt where a later request is likely to start again (state reuse,
    docs/state-reuse.md): the phone may save a checkpoint there.

    ``at`` counts prompt tokens (``prompt_ids[:at]`` is the prefix worth keeping). ``shared`` marks a
    prefix that other conversations share (the end of a system/tools block): a checkpoint there is
    worth more than a conversation's own boundary, which the conversation's next boundary supersedes.
    """

    at: int
    shared: bool = False


@dataclass(slots=True)
class GenerationParams:
    """One request, in phone terms (token ids in, token ids out). Field names follow
    device-protocol.md's `generate` op.

    ``prompt_ids`` is always the *whole* prompt. Which part of it a phone still holds from earlier
    requests (its live state, a checkpoint) and so need not process again is the phone's business
    (``server.backends.adb``), as is where it saves checkpoints (among ``boundaries``). ``reset``
    true lets the phone reuse what it holds when that is exactly a prefix of the prompt; false is
    not used by the serving layer."""

    request_id: str
    model: str
    prompt_ids: list[int]
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)
    reset: bool = True
    boundaries: list[Boundary] = field(default_factory=list)  # where checkpoints are worth saving
    # vLLM's extensions: the stop ids end the request not at all (ignore_eos) or only from the
    # min_tokens-th generated token on. The host applies them (server/serving/driver.py sends the
    # phone no stop ids); a runtime that cannot go past its own end (one-shot) ignores them.
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(slots=True)
class Started:
    request_id: str
    prompt_tokens: int
    state_tokens: int
    phone: str  # serial of the phone that runs it
    cached_tokens: int = 0  # prompt tokens the phone did not process again (state reuse)


@dataclass(slots=True)
class Tokens:
    request_id: str
    ids: list[int]
    t_ms: float | None  # phone monotonic clock (None in one-shot mode)


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(slots=True)
class Finished:
    request_id: str
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    prefill_ms: float
    decode_ms: float


Event = Started | Tokens | Finished


class Admission:
    """Tells the API layer when every phone request of one API request is past admission: queued for
    a phone or running on one, so no longer refusable with a status code (429 queue full, 503, 404).

    A streaming response commits to its 200 only then (server/api/sse.py); without it a refusal that
    took a few event-loop turns to arrive (``n`` > 1 choices, a loaded loop) came as an error event
    after a 200. The API layer puts one in :data:`admission` around a generation; the serving layer
    says how many phone requests (choices) to expect; the pool calls :meth:`admitted` once per phone
    request it queues or grants a phone to. Backends that do not call it leave the API layer to its
    fallback wait.
    """

    def __init__(self) -> None:
        self._expected = 1
        self._admitted = 0
        self.done = asyncio.Event()

    def expect(self, n: int) -> None:
        self._expected = n
        self._check()

    def admitted(self) -> None:
        self._admitted += 1
        self._check()

    def _check(self) -> None:
        if self._admitted >= self._expected:
            self.done.set()


# the current request's Admission; asyncio tasks copy it when they are created
admission: contextvars.ContextVar[Admission | None] = contextvars.ContextVar("qhx_admission", default=None)


class PhoneState(str, enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    RESTARTING = "restarting"
    OFFLINE = "offline"
    INCOMPATIBLE = "incompatible"
    QUARANTINED = "quarantined"


@dataclass(slots=True)
class ModelInfo:
    """A model as served: derived from a bundle on a phone (device-protocol.md section 1)."""

    name: str  # e.g. qwen3.5-0.8b or qwen3.5-0.8b-w8
    precision: str  # fp16 | w8
    max_context: int  # 1024
    tokenizer_path: str  # host path of the bundle's tokenizer.json (cache keyed by sha256)
    tokenizer_sha256: str
    phones: list[str] = field(default_factory=list)
    simulated: bool = False


@dataclass(frozen=True, slots=True)
class PhoneCondition:
    """What routing weighs of a phone's health (its latest reading, server/backends/adb/telemetry.py):
    thermal status and temperature (None: unknown), and ``drained``: why it gets no new requests
    (``thermal``, ``battery``), None when it gets them."""

    thermal_status: int | None = None
    temperature_c: float | None = None
    drained: str | None = None


@dataclass(slots=True)
class PhoneHealth:
    serial: str
    adb_server: str
    state: PhoneState
    model: str | None = None
    product_model: str | None = None
    soc: str | None = None
    bundles: list[str] = field(default_factory=list)  # every bundle on the phone
    bundle: str | None = None  # the one it serves
    mode: str | None = None  # session | oneshot
    request_in_flight: str | None = None
    tokens_served: int = 0
    last_decode_tps: float | None = None
    last_error: str | None = None
    uptime_s: float = 0.0  # since it last became ready (0 when not serving)
    simulated: bool = False
    failures: int = 0  # failures in a row (a successful request resets it)
    retry_in_s: float | None = None  # while quarantined: seconds until it is tried again
    state_tokens: int | None = None  # tokens its live state holds, as the host knows it (None: unknown)
    checkpoint_slots: int = 0  # checkpoint slots its runtime has (0: none, a v1 runtime)
    checkpoints_used: int = 0  # slots holding a checkpoint
    # health over time (server/backends/adb/telemetry.py); None: unknown (not read yet, or not said)
    thermal_status: int | None = None  # Android's PowerManager level: 0 NONE 1 LIGHT 2 MODERATE 3 SEVERE ..
    temperature_c: float | None = None  # its skin sensor (else its battery, else its hottest sensor)
    battery_level: float | None = None  # percent
    charging: bool | None = None
    battery_temperature_c: float | None = None
    decode_tps: float | None = None  # measured: decode tokens/s of the requests of the last minute or so
    drained: str | None = None  # why it gets no new requests: "thermal" or "battery"; None: it gets them
    telemetry_age_s: float | None = None  # since its last health reading
    telemetry_error: str | None = None  # why its last health poll failed


class Backend(abc.ABC):
    """What the serving layer drives. Implementations: one phone, or the pool of phones."""

    @abc.abstractmethod
    def generate(self, params: GenerationParams) -> AsyncIterator[Event]:
        """Run one request; yields Started, Tokens..., Finished; raises BackendError on failure."""

    @abc.abstractmethod
    async def cancel(self, request_id: str) -> None:
        """Cancel a running request (no-op if unknown or finished)."""

    @abc.abstractmethod
    def models(self) -> list[ModelInfo]:
        """Models currently servable (at least one phone ready or starting)."""

    @abc.abstractmethod
    def health(self) -> list[PhoneHealth]:
        """One entry per known phone."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop sessions and release adb streams."""
