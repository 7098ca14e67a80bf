"""The phone pool: every phone of every configured adb server behind one ``Backend``.

A phone runs one generation at a time. Requests for a model wait in that model's FIFO queue until a
ready, idle phone serving the model is free (docs/pool.md):

* routing: a free phone goes to the oldest waiter that may use it; of several free phones, the one
  idle longest is used first, so that load spreads over all phones;
* the queue is bounded (``Settings.max_queue`` waiting requests per model, then
  :class:`~server.errors.Overloaded` -> 429 with ``Retry-After``: the expected time until a phone
  frees up, from the recent request durations) and so is the wait (``Settings.queue_timeout_s``,
  then :class:`~server.errors.NoPhoneAvailable` -> 503, code ``queue_timeout``);
* when the last phone of a model goes away (unplugged, adb server gone), its waiters get 503 at once
  instead of waiting for the timeout;
* a request whose phone fails before any token reached the caller is retried once, at the head of
  the queue, on another phone when there is one (the caller never notices); after the first token
  the error reaches the caller. A phone that went away between being granted and being used is not
  a failure: the request goes back to the head of the queue.

Phone health (quarantine after failures in a row) is the phone's own business
(``server.backends.adb.phone``): the pool routes to READY phones only.

A single phone is a pool of one: the API layer only ever talks to this class.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
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

# states of a phone that serves, or soon will again; OFFLINE and INCOMPATIBLE phones do not count
_PRESENT = frozenset(
    {PhoneState.STARTING, PhoneState.READY, PhoneState.BUSY, PhoneState.RESTARTING, PhoneState.QUARANTINED}
)
_SERVING = frozenset({PhoneState.READY, PhoneState.BUSY})
MAX_REGRANTS = 3  # a request whose granted phone vanished goes back to the queue this often at most
RETRY_AFTER_MAX_S = 60.0
SERVICE_EWMA = 0.2  # weight of the newest request duration in the Retry-After estimate


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
    """Where phones come from (``server.backends.adb.fleet.AdbFleet``), keyed by a stable name."""

    @property
    def phones(self) -> Mapping[str, PoolPhone]: ...

    async def aclose(self) -> None: ...


@dataclass(eq=False)
class _Waiter:
    request_id: str
    model: str
    future: asyncio.Future[str]
    exclude: frozenset[str] = frozenset()  # phones that failed this request (avoided when possible)
    enqueued: float = field(default_factory=time.monotonic)


class PhonePool(Backend):
    """Routes requests to idle phones; FIFO per model; bounded queue and wait."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._source: PhoneSource | None = None
        self._queues: dict[str, collections.deque[_Waiter]] = collections.defaultdict(collections.deque)
        self._leased: dict[str, str] = {}  # phone key -> request id
        self._running: dict[str, PoolPhone] = {}  # request id -> phone
        self._idle_since: dict[str, float] = {}  # phone key -> when it was last handed back
        self._service_s: dict[str, float] = {}  # model -> moving average of a request's phone time
        self.queue_wait_observer: Callable[[str, float], None] | None = None

    def attach(self, source: PhoneSource) -> None:
        self._source = source

    # -- phone events -------------------------------------------------------------------------

    def phone_changed(self, _phone: object = None) -> None:
        """Called by the phone source (on the event loop) whenever a phone's state changes: hands
        idle phones to the oldest waiters, fails the waiters of a model no phone serves any more."""
        self._dispatch()

    def _phones(self) -> Mapping[str, PoolPhone]:
        return self._source.phones if self._source is not None else {}

    def _of_model(self, model: str, states: frozenset[PhoneState]) -> list[str]:
        return [
            key
            for key, phone in self._phones().items()
            if phone.model is not None and phone.model.name == model and phone.state in states
        ]

    def _idle(self, model: str) -> list[str]:
        """Ready phones of the model nobody holds, idle longest first."""
        idle = [k for k in self._of_model(model, frozenset({PhoneState.READY})) if k not in self._leased]
        return sorted(idle, key=lambda k: self._idle_since.get(k, 0.0))

    def _may_use(self, waiter: _Waiter, key: str, serving: list[str]) -> bool:
        # a phone that failed this request is avoided while another phone serves the model
        return key not in waiter.exclude or all(k in waiter.exclude for k in serving)

    def _dispatch(self) -> None:
        for model, queue in self._queues.items():
            while queue and queue[0].future.done():  # timed out or cancelled while queued
                queue.popleft()
            if not queue:
                continue
            if not self._of_model(model, _PRESENT):
                self._fail_all(model, queue)
                continue
            serving = self._of_model(model, _SERVING)
            for key in self._idle(model):
                waiter = next(
                    (w for w in queue if not w.future.done() and self._may_use(w, key, serving)), None
                )
                if waiter is None:
                    continue
                queue.remove(waiter)
                self._leased[key] = waiter.request_id
                waiter.future.set_result(key)

    def _fail_all(self, model: str, queue: collections.deque[_Waiter]) -> None:
        logger.warning("no phone serves %s any more: %d queued request(s) fail", model, len(queue))
        while queue:
            waiter = queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(
                    NoPhoneAvailable(f"No phone serves `{model}` any more (unplugged or adb server gone).")
                )

    # -- leasing ------------------------------------------------------------------------------

    def _retry_after(self, model: str) -> float:
        """Seconds until a queue slot is likely free: one phone finishing its request."""
        phones = max(1, len(self._of_model(model, _SERVING)))
        return min(RETRY_AFTER_MAX_S, max(1.0, self._service_s.get(model, 1.0) / phones))

    async def _acquire(self, params: GenerationParams, exclude: frozenset[str], *, front: bool) -> str:
        """A phone key leased to this request (released by ``_release``)."""
        model = params.model
        if not self._of_model(model, _PRESENT):
            if front:  # it was served a moment ago
                raise NoPhoneAvailable(f"No phone serves `{model}` any more (unplugged or adb server gone).")
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        queue = self._queues[model]
        if not front and self.queue_depth(model) >= self._settings.max_queue:
            raise Overloaded(
                f"The queue for `{model}` is full ({self._settings.max_queue} waiting); retry later.",
                retry_after=self._retry_after(model),
            )
        waiter = _Waiter(params.request_id, model, asyncio.get_running_loop().create_future(), exclude)
        if front:  # a retry: it waited its turn already
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        self._dispatch()
        timeout = self._settings.queue_timeout_s
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.future), timeout)
        except TimeoutError:
            waiter.future.cancel()
            raise NoPhoneAvailable(
                f"No phone serving `{model}` became free within {timeout:g} s.", code="queue_timeout"
            ) from None
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self._release(future.result())  # granted just as we were cancelled
            future.cancel()
            raise
        finally:
            if self.queue_wait_observer is not None:
                self.queue_wait_observer(model, time.monotonic() - waiter.enqueued)

    def _release(self, key: str) -> None:
        self._leased.pop(key, None)
        self._idle_since[key] = time.monotonic()
        self._dispatch()

    def _observe_service(self, model: str, seconds: float) -> None:
        old = self._service_s.get(model)
        self._service_s[model] = seconds if old is None else old + SERVICE_EWMA * (seconds - old)

    # -- Backend contract ---------------------------------------------------------------------

    async def generate(self, params: GenerationParams) -> AsyncIterator[Event]:  # type: ignore[override]
        tried: set[str] = set()
        front = False
        regrants = 0
        while True:
            key = await self._acquire(params, frozenset(tried), front=front)
            front = True  # whatever happens next, a new attempt keeps its place at the head
            phone = self._phones().get(key)
            streamed = False
            t0 = time.monotonic()
            try:
                if phone is None or phone.state is not PhoneState.READY:
                    regrants += 1
                    if regrants > MAX_REGRANTS:
                        raise NoPhoneAvailable(f"The phones granted to {params.request_id} kept going away.")
                    logger.info("request %s: phone %s went away before it started; back to the queue",
                                params.request_id, key)
                    continue
                self._running[params.request_id] = phone
                agen = phone.generate(params)
                try:
                    async for event in agen:
                        if isinstance(event, Tokens):
                            streamed = True
                        elif isinstance(event, Finished):
                            self._observe_service(params.model, time.monotonic() - t0)
                        yield event
                        if isinstance(event, Finished):
                            return
                finally:
                    await agen.aclose()  # type: ignore[attr-defined]
                return
            except BackendError as exc:
                tried.add(key)
                if streamed or not exc.retryable or len(tried) > 1:
                    raise
                logger.warning(
                    "request %s: phone %s failed before its first token (%s); retrying once",
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
            if info is None or phone.state not in _PRESENT:
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
        """Requests waiting for a phone (of one model, or of all)."""
        queues = [self._queues[model]] if model else list(self._queues.values())
        return sum(1 for q in queues for w in q if not w.future.done())

    def running(self) -> int:
        """Requests on a phone right now."""
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
