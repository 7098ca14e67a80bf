"""The phone pool: every phone of every configured adb server behind one ``Backend``.

A phone runs one generation at a time. Requests for a model wait in that model's FIFO queue until a
ready, idle phone serving the model is free; the queue is bounded (``Settings.max_queue``, then
:class:`~server.errors.Overloaded` -> 429 with Retry-After) and so is the wait
(``Settings.queue_timeout_s``, then :class:`~server.errors.NoPhoneAvailable` -> 503).

A request whose phone fails before any token reached the caller is retried once on another phone
(the caller never notices); after the first token the error reaches the caller.

A single phone is a pool of one: the API layer only ever talks to this class.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from server.backends.base import (
    Backend,
    Event,
    Finished,
    GenerationParams,
    ModelInfo,
    PhoneHealth,
    PhoneState,
    Tokens,
)
from server.errors import BackendError, ModelNotFound, NoPhoneAvailable, Overloaded

if TYPE_CHECKING:
    from server.settings import Settings

logger = logging.getLogger(__name__)


class PoolPhone(Protocol):
    """What the pool needs of a phone (``server.backends.adb.phone.Phone`` provides it)."""

    @property
    def state(self) -> PhoneState: ...

    @property
    def model(self) -> ModelInfo | None: ...

    def generate(self, params: GenerationParams) -> AsyncIterator[Event]: ...

    async def cancel(self, request_id: str) -> None: ...

    def health(self) -> list[PhoneHealth]: ...


class PhoneSource(Protocol):
    """Where phones come from (``server.backends.adb.fleet.AdbFleet``)."""

    phones: dict[str, PoolPhone]

    async def aclose(self) -> None: ...


@dataclass
class _Waiter:
    model: str
    future: asyncio.Future[str]
    enqueued: float = field(default_factory=time.monotonic)
    exclude: frozenset[str] = frozenset()


class PhonePool(Backend):
    """Routes requests to idle phones; FIFO per model; bounded queue."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._source: PhoneSource | None = None
        self._queues: dict[str, collections.deque[_Waiter]] = collections.defaultdict(collections.deque)
        self._leased: dict[str, str] = {}  # phone key -> request id
        self._running: dict[str, PoolPhone] = {}  # request id -> phone
        self.queue_wait_observer: Callable[[str, float], None] | None = None

    def attach(self, source: PhoneSource) -> None:
        self._source = source

    # -- phone events -------------------------------------------------------------------------

    def phone_changed(self, _phone: object = None) -> None:
        """Called by the phone source whenever a phone's state changes (any thread-safe context of
        the event loop). Hands idle phones to the oldest waiters."""
        self._dispatch()

    def _phones(self) -> dict[str, PoolPhone]:
        return self._source.phones if self._source is not None else {}

    def _idle_phones(self, model: str, exclude: frozenset[str]) -> list[str]:
        return [
            key
            for key, phone in self._phones().items()
            if phone.state is PhoneState.READY
            and phone.model is not None
            and phone.model.name == model
            and key not in self._leased
            and key not in exclude
        ]

    def _dispatch(self) -> None:
        for model, queue in self._queues.items():
            while queue:
                waiter = queue[0]
                if waiter.future.done():  # timed out or cancelled while queued
                    queue.popleft()
                    continue
                idle = self._idle_phones(model, waiter.exclude)
                if not idle:
                    break
                queue.popleft()
                self._leased[idle[0]] = "reserved"
                waiter.future.set_result(idle[0])

    # -- leasing ------------------------------------------------------------------------------

    async def _acquire(self, params: GenerationParams, exclude: frozenset[str]) -> str:
        if not any(m.name == params.model for m in self.models()):
            raise ModelNotFound(f"The model `{params.model}` does not exist.", param="model")
        queue = self._queues[params.model]
        if len(queue) >= self._settings.max_queue:
            raise Overloaded(
                f"The queue for `{params.model}` is full ({self._settings.max_queue} waiting); retry later.",
                retry_after=1.0,
            )
        waiter = _Waiter(params.model, asyncio.get_running_loop().create_future(), exclude=exclude)
        queue.append(waiter)
        self._dispatch()
        try:
            key = await asyncio.wait_for(asyncio.shield(waiter.future), self._settings.queue_timeout_s)
        except TimeoutError:
            waiter.future.cancel()
            raise NoPhoneAvailable(
                f"No phone serving `{params.model}` became free within {self._settings.queue_timeout_s:.0f} s."
            ) from None
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release(waiter.future.result())  # granted just as we were cancelled
            waiter.future.cancel()
            raise
        finally:
            if self.queue_wait_observer is not None:
                self.queue_wait_observer(params.model, time.monotonic() - waiter.enqueued)
        self._leased[key] = params.request_id
        return key

    def _release(self, key: str) -> None:
        self._leased.pop(key, None)
        self._dispatch()

    # -- Backend contract ---------------------------------------------------------------------

    async def generate(self, params: GenerationParams) -> AsyncIterator[Event]:  # type: ignore[override]
        tried: set[str] = set()
        while True:
            key = await self._acquire(params, frozenset(tried))
            phone = self._phones().get(key)
            streamed = False
            try:
                if phone is None:
                    raise NoPhoneAvailable("The phone chosen for this request went away.")
                self._running[params.request_id] = phone
                agen = phone.generate(params)
                try:
                    async for event in agen:
                        if isinstance(event, Tokens):
                            streamed = True
                        yield event
                        if isinstance(event, Finished):
                            return
                finally:
                    await agen.aclose()
                return
            except BackendError as exc:
                tried.add(key)
                if streamed or not exc.retryable or len(tried) > 1:
                    raise
                logger.warning(
                    "request %s: phone %s failed before its first token (%s); retrying on another phone",
                    params.request_id, key, exc.code,
                )
            finally:
                self._running.pop(params.request_id, None)
                self._release(key)

    async def cancel(self, request_id: str) -> None:
        phone = self._running.get(request_id)
        if phone is not None:
            await phone.cancel(request_id)

    def models(self) -> list[ModelInfo]:
        merged: dict[str, ModelInfo] = {}
        for key, phone in self._phones().items():
            info = phone.model
            if info is None or phone.state in (PhoneState.INCOMPATIBLE, PhoneState.OFFLINE):
                continue
            if info.name not in merged:
                merged[info.name] = ModelInfo(
                    name=info.name, precision=info.precision, max_context=info.max_context,
                    tokenizer_path=info.tokenizer_path, tokenizer_sha256=info.tokenizer_sha256,
                    phones=[], simulated=info.simulated,
                )
            merged[info.name].phones.append(key)
            merged[info.name].simulated = merged[info.name].simulated and info.simulated
        return list(merged.values())

    def health(self) -> list[PhoneHealth]:
        return [h for phone in self._phones().values() for h in phone.health()]

    def queue_depth(self, model: str | None = None) -> int:
        queues = [self._queues[model]] if model else list(self._queues.values())
        return sum(1 for q in queues for w in q if not w.future.done())

    def running(self) -> int:
        return len(self._running)

    async def aclose(self) -> None:
        for queue in self._queues.values():
            for waiter in queue:
                waiter.future.cancel()
            queue.clear()
        if self._source is not None:
            await self._source.aclose()


async def build_backend(settings: Settings) -> PhonePool:
    """The app's backend: an ``AdbFleet`` over the configured adb servers behind a ``PhonePool``."""
    from server.backends.adb.fleet import AdbFleet

    pool = PhonePool(settings)
    fleet = AdbFleet(settings, on_change=pool.phone_changed)
    pool.attach(fleet)  # type: ignore[arg-type]
    await fleet.start()
    return pool

