"""In-process phones for the scheduler's unit tests (routing, FIFO, bounds, retries).

Not the simulated phone (that one is reached through the real adb server; the e2e tests use it):
these are the smallest ``PoolPhone`` that lets a test hold a request on a phone, release it, fail it
before or after its first token, and change the phone's state, deterministically and in microseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from server.backends.base import (
    Backend,
    Event,
    Finished,
    GenerationParams,
    ModelInfo,
    PhoneCondition,
    PhoneHealth,
    PhoneState,
    Started,
    Tokens,
)
from server.errors import PhoneLost
from server.scheduling.pool import PhonePool
from server.scheduling.routing import Router
from server.settings import Settings


def model_info(name: str = "m") -> ModelInfo:
    return ModelInfo(name=name, precision="fp16", max_context=1024, tokenizer_path="", tokenizer_sha256="")


@dataclass(eq=False)
class DoublePhone(Backend):
    """A phone serving ``model``. ``hold`` keeps every request on the phone until ``release()``;
    ``fail_before``/``fail_after_first`` make the next requests fail that way. A request gets its
    ``max_new`` tokens in one ``Tokens`` event. It passes the Backend contract (tests/contract/).

    For routing, it says what it holds (``holds``: token sequences, as a phone's live state and
    checkpoints; it would reuse the longest that is a prefix of a prompt) and what a prompt token costs
    it (``prefill_ms_per_token``, None: not measured); neither changes as it serves."""

    key: str
    pool: PhonePool | None = None
    model: ModelInfo | None = field(default_factory=model_info)
    state: PhoneState = PhoneState.READY
    hold: bool = False
    fail_before: int = 0  # the next N requests fail before their first token
    fail_after_first: int = 0  # the next N requests fail right after their first token
    after_failure: PhoneState = PhoneState.READY  # the state a failure leaves it in
    steps: int = 0  # event-loop turns a request takes on the phone: before its first token, after, and to end
    served: list[str] = field(default_factory=list)  # request ids, in start order
    in_flight: str | None = None  # the request on the phone
    holds: list[Sequence[int]] = field(default_factory=list)  # what it would reuse (prefixes of prompts)
    prefill_ms_per_token: float | None = None
    condition: PhoneCondition = field(default_factory=PhoneCondition)  # its health, as routing weighs it
    _gate: asyncio.Event = field(default_factory=asyncio.Event)

    def set_state(self, state: PhoneState) -> None:
        self.state = state
        if self.pool is not None:
            self.pool.phone_changed(self)

    def release(self) -> None:
        self._gate.set()

    async def generate(self, params: GenerationParams) -> AsyncIterator[Event]:
        assert self.state is PhoneState.READY, f"{self.key} got a request while {self.state.value}"
        rid = params.request_id
        self.served.append(rid)
        self.in_flight = rid
        self.set_state(PhoneState.BUSY)
        after = PhoneState.READY
        try:
            yield Started(rid, len(params.prompt_ids), 0, self.key)
            await self._turns()
            if self.fail_before:
                self.fail_before -= 1
                after = self.after_failure
                raise PhoneLost(f"{self.key} died before the first token of {rid}")
            yield Tokens(rid, [1] * params.max_new, None)
            if self.fail_after_first:
                self.fail_after_first -= 1
                after = self.after_failure
                raise PhoneLost(f"{self.key} died during {rid}")
            await self._turns()
            if self.hold:
                self._gate.clear()
                await self._gate.wait()
            yield Finished(rid, "length", len(params.prompt_ids), params.max_new, 1.0, 1.0)
        finally:
            try:
                await self._turns()  # letting go takes a while too (a real phone confirms a cancel)
            finally:  # even when a second cancel cuts that short
                self.in_flight = None
                if self.state is PhoneState.BUSY:
                    self.set_state(after)

    async def _turns(self) -> None:
        for _ in range(self.steps):
            await asyncio.sleep(0)

    def reusable(self, prompt_ids: Sequence[int]) -> int:
        prompt = list(prompt_ids)
        return max((len(h) for h in self.holds if list(h) == prompt[: len(h)]), default=0)

    async def cancel(self, request_id: str) -> None:
        if request_id == self.in_flight:
            self.release()

    def models(self) -> list[ModelInfo]:
        present = self.state not in (PhoneState.OFFLINE, PhoneState.INCOMPATIBLE, PhoneState.QUARANTINED)
        return [self.model] if self.model is not None and present else []

    def health(self) -> list[PhoneHealth]:
        return [PhoneHealth(self.key, "double", self.state, request_in_flight=self.in_flight)]

    async def aclose(self) -> None:
        return None


class DoubleSource:
    """The pool's phone source: a dict of DoublePhones (each tells its pool of its changes itself)."""

    def __init__(self) -> None:
        self.phones: dict[str, DoublePhone] = {}

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def make_pool(
    n: int = 2, *, router: Router | None = None, **settings: object
) -> tuple[PhonePool, dict[str, DoublePhone]]:
    source = DoubleSource()
    # the doubles report no health: their pools route without the thermal layer unless a test asks for it
    settings = {"thermal_routing": "off", **settings}
    pool = PhonePool(Settings(sim=0, **settings), lambda _changed: source, router=router)  # type: ignore[arg-type]
    for i in range(n):
        source.phones[f"p{i}"] = DoublePhone(f"p{i}", pool)
    return pool, source.phones


def params(rid: str, model: str = "m", prompt_ids: Sequence[int] = (1, 2, 3)) -> GenerationParams:
    return GenerationParams(request_id=rid, model=model, prompt_ids=list(prompt_ids), max_new=4)


async def run(pool: PhonePool, rid: str, model: str = "m", prompt_ids: Sequence[int] = (1, 2, 3)) -> list[Event]:
    return [ev async for ev in pool.generate(params(rid, model, prompt_ids))]
