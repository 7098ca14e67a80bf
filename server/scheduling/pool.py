"""The phone pool: every phone of every configured adb server behind one ``Backend``.

A phone runs one generation at a time. Requests for a model wait in that model's FIFO queue until a
ready, idle phone serving the model is free (docs/pool.md):

* routing: waiters are offered the free phones oldest first, and a :class:`~server.scheduling.routing
  .Router` chooses (``PrefixAware`` with ``state_reuse on``: the lowest expected time to first token,
  counting what each phone would reuse of the prompt; ``IdleLongest`` with it off: of several free
  phones, the one idle longest, so that load spreads over all phones). A router may leave a request
  waiting for a busy phone beside a free one (``WaitFor``): bounded, the pool asks it again by the
  deadline it names; later waiters may take the free phones meanwhile;
* the queue is bounded (``Settings.max_queue`` waiting requests per model, then
  :class:`~server.errors.Overloaded` -> 429 with ``Retry-After``: the expected time until a phone
  frees up, from the recent request durations) and so is the wait (``Settings.queue_timeout_s``,
  then :class:`~server.errors.NoPhoneAvailable` -> 503, code ``queue_timeout``);
* the bound applies to requests that must wait: a request that an idle phone can take right away
  takes it, however long the queue (its waiters cannot use that phone, or chose to wait for a busy
  one); a new request that would rather wait for a busy phone takes a free one when the queue is full;
* when the last phone of a model goes away (unplugged, adb server gone), its waiters get 503 at once
  instead of waiting for the timeout, and so do new requests for it (503, not 404: the model was
  served and its phones may come back; a name never served is ``ModelNotFound`` -> 404);
* a request whose phone fails before any token reached the caller is retried once, at the head of
  the queue, on another phone when there is one (the caller never notices); after the first token
  the error reaches the caller. A phone that went away between being granted and being used is not
  a failure: the request goes back to the head of the queue.

Leases. A phone is *leased* to one request from the moment ``_dispatch`` grants it to a waiter until
``_release``: granted (the waiter's future holds the phone's key, its task has not woken up yet),
then claimed (the request runs on it). ``_lease`` is the one place a lease is taken and given back:
a waiter that leaves the queue in any other way than by claiming its grant (queue timeout,
cancellation, the client gone, an error) gives back whatever was granted to it meanwhile
(``_withdraw``), and a claimed lease is released when the request's block ends, however it ends.
``audit()`` checks that bookkeeping, and that nobody waits beside a free phone it may use except by
its router's bounded choice (tests assert it under load).

Phone health (quarantine after failures in a row) is the phone's own business
(``server.backends.adb.phone``): the pool routes to READY phones only.

A single phone is a pool of one: the API layer only ever talks to this class.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from server.backends.base import (
    Backend,
    Event,
    Finished,
    GenerationParams,
    ModelInfo,
    PhoneCondition,
    PhoneHealth,
    PhoneState,
    Tokens,
    admission,
)
from server.errors import BackendError, ModelNotFound, NoPhoneAvailable, Overloaded
from server.scheduling.routing import (
    IdleLongest,
    PhoneView,
    PrefixAware,
    Route,
    Router,
    RouteRequest,
    ThermalAware,
    WaitFor,
)

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
SERVICE_EWMA = 0.2  # weight of the newest request duration in the Retry-After and routing estimates
# a request that has held its phone past (1 - this) of the average is taken to need this much of an
# average more: how long it still runs is unknown, not 0 (else waiting for it would look free)
REMAINING_FLOOR = 0.5
RECHECK_SLACK_S = 0.001  # a deadline's recheck runs this late, so that a timer firing early finds it passed


class PoolPhone(Protocol):
    """What the pool needs of a phone (``server.backends.adb.phone.Phone`` provides it)."""

    @property
    def state(self) -> PhoneState: ...

    @property
    def model(self) -> ModelInfo | None: ...

    def generate(self, params: GenerationParams) -> AsyncIterator[Event]: ...

    async def cancel(self, request_id: str) -> None: ...

    def health(self) -> list[PhoneHealth]: ...

    def reusable(self, prompt_ids: Sequence[int]) -> int:
        """Prompt tokens it would not process again if asked to run this prompt now (state reuse)."""
        ...

    @property
    def prefill_ms_per_token(self) -> float | None:
        """Its measured cost of one prompt token (None: not measured yet)."""
        ...

    @property
    def condition(self) -> PhoneCondition:
        """Its latest health reading as routing weighs it (thermal status, temperature, drained)."""
        ...


class PhoneSource(Protocol):
    """Where phones come from (``server.backends.adb.fleet.AdbFleet``), keyed by a stable name. It
    calls the hook it was made with (:data:`SourceFactory`) whenever a phone's state changes."""

    @property
    def phones(self) -> Mapping[str, PoolPhone]: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


PhoneChanged = Callable[[object], None]
# makes the pool's phone source, given the hook it must call on every phone change (on the event loop)
SourceFactory = Callable[[PhoneChanged], PhoneSource]


def merge_models(phones: Mapping[str, PoolPhone]) -> list[ModelInfo]:
    """The models the phones serve, one entry per name listing its phones (keys), in the phones' order:
    the only place they are merged. A phone counts while it is present (ready, busy, starting,
    restarting or quarantined: its model is served, or soon will be again), which is also what tells
    a queued request from a model with no phone (503) in the pool. ``simulated`` only when every one
    of the model's phones is simulated."""
    merged: dict[str, ModelInfo] = {}
    for key, phone in phones.items():
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


@dataclass
class _Attempts:
    """A request's attempts so far, and the rules for another: a phone that went away between grant
    and claim sends it back to the queue (``MAX_REGRANTS`` times at most); a phone that failed it before
    its first token reached the caller, once, sends it back to the head of the queue, avoiding that
    phone while another serves the model."""

    request_id: str
    failed_on: set[str] = field(default_factory=set)  # phones that failed it
    failures: int = 0  # counted apart: with one phone, ``failed_on`` never grows past one key
    regrants: int = 0
    front: bool = False  # a new attempt goes to the head of the queue: it waited its turn already
    streamed: bool = False  # a token reached the caller: its error is the caller's from then on

    def went_away(self, key: str) -> None:
        self.regrants += 1
        if self.regrants > MAX_REGRANTS:
            raise NoPhoneAvailable(f"The phones granted to {self.request_id} kept going away.")
        logger.info("request %s: phone %s went away before it started; back to the queue", self.request_id, key)

    def retry_after(self, key: str, exc: BackendError) -> bool:
        """Whether the request tries again now that phone ``key`` failed it with ``exc``."""
        self.failed_on.add(key)
        self.failures += 1
        if self.streamed or not exc.retryable or self.failures > 1:
            return False
        logger.warning("request %s: phone %s failed before its first token (%s); retrying once",
                       self.request_id, key, exc.code)
        return True


@dataclass(eq=False)
class _Waiter:
    request: RouteRequest  # what the router sees
    future: asyncio.Future[str]  # the key of the phone granted to it

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def model(self) -> str:
        return self.request.model


class PhonePool(Backend):
    """Routes requests to idle phones; FIFO per model; bounded queue and wait. ``source`` makes the
    phone source, wired to :meth:`phone_changed`; :meth:`start` starts it."""

    def __init__(self, settings: Settings, source: SourceFactory, *, router: Router | None = None) -> None:
        self._settings = settings
        self._router: Router = router or default_router(settings)
        self._queues: dict[str, collections.deque[_Waiter]] = collections.defaultdict(collections.deque)
        self._leased: dict[str, str] = {}  # phone key -> request id (granted or running)
        self._granted: dict[str, _Waiter] = {}  # phone key -> the waiter it was granted to, not yet claimed
        # request id -> (phone key, phone): the lease a request claimed, from the claim until its phone
        # has let go. The pool's own record, not the phone's request in flight (the phone owns that:
        # PhoneHealth.request_in_flight), which starts later (after the previous request's cleanup on
        # the phone) and which a phone double need not report; cancel() finds the phone here (the phone
        # then checks the id against its own), audit() catches a lease that outlived its request.
        self._running: dict[str, tuple[str, PoolPhone]] = {}
        self._idle_since: dict[str, float] = {}  # phone key -> when it was last handed back
        self._leased_at: dict[str, float] = {}  # phone key -> when it was leased (granted) to its request
        # a router's WaitFor deadline: the pool asks again then (the earliest one pending; None: none)
        self._recheck: asyncio.TimerHandle | None = None
        self._recheck_at: float | None = None  # time.monotonic() of that deadline
        self._service_s: dict[str, float] = {}  # model -> moving average of a request's phone time
        self._served: set[str] = set()  # models a phone has served (ready or busy) since the start
        self._watchers: list[Callable[[], None]] = []  # told of every phone or queue change (watch())
        self._source = source(self.phone_changed)

    async def start(self) -> None:
        """Starts the phone source: the phones it knows at once are known when this returns."""
        await self._source.start()

    # -- phone events -------------------------------------------------------------------------

    def phone_changed(self, _phone: object = None) -> None:
        """Called by the phone source (on the event loop) whenever a phone's state changes: hands
        idle phones to the oldest waiters, fails the waiters of a model no phone serves any more."""
        self._note_served()
        self._dispatch()

    def _phones(self) -> Mapping[str, PoolPhone]:
        return self._source.phones

    def _note_served(self) -> None:
        for phone in self._phones().values():
            if phone.model is not None and phone.state in _SERVING:
                self._served.add(phone.model.name)

    def _of_model(self, model: str, states: frozenset[PhoneState]) -> list[str]:
        return [
            key
            for key, phone in self._phones().items()
            if phone.model is not None and phone.model.name == model and phone.state in states
        ]

    def _view(self, key: str, phone: PoolPhone, request: RouteRequest, *, named: bool = False, ahead: int = 0,
              now: float, peers_ms: float | None) -> PhoneView:
        """Phone ``key`` as the router sees it for ``request``. ``named``: granted to an earlier waiter
        of the same round (leased from now on); ``ahead``: earlier waiters of the round that chose to
        wait for it (each adds one average request to its wait); ``peers_ms``: the cost per prompt token
        it is taken to have until it measured its own (:meth:`_peers_prefill_ms`)."""
        leased = named or key in self._leased
        wait: float | None = 0.0
        if phone.state is not PhoneState.READY or leased:
            service = self._service_s.get(request.model)
            if service is None or not leased:  # no estimate yet; or busy outside a lease (winding down)
                wait = None
            else:
                held = 0.0 if named else now - self._leased_at.get(key, now)
                wait = max(service - held, REMAINING_FLOOR * service) + ahead * service
        prompt = len(request.prompt_ids)
        reusable = min(max(phone.reusable(request.prompt_ids), 0), prompt) if prompt else 0
        own = phone.prefill_ms_per_token
        health = phone.condition
        return PhoneView(key, phone.state, leased, self._idle_since.get(key, 0.0), reusable, wait,
                         peers_ms if own is None else own, health.thermal_status, health.temperature_c,
                         health.drained)

    def _peers_prefill_ms(self, keys: Iterable[str]) -> float | None:
        """The median cost per prompt token of the phones that measured one: what a phone that has not
        is taken to cost (a phone new to the pool is not taken for slower than its peers)."""
        phones = self._phones()
        measured = [c for key in keys if (c := phones[key].prefill_ms_per_token) is not None]
        return statistics.median(measured) if measured else None

    def _idle(self, model: str) -> list[str]:
        """Ready phones of the model nobody holds."""
        phones = self._phones()
        return [k for k in self._of_model(model, _SERVING) if self._free(k, phones[k])]

    def _free(self, key: str, phone: PoolPhone, named: Iterable[str] = ()) -> bool:
        return phone.state is PhoneState.READY and key not in self._leased and key not in named

    def _dispatch(self) -> None:
        for model, queue in self._queues.items():
            while queue and queue[0].future.done():  # timed out or cancelled while queued
                queue.popleft()
            if not queue:
                continue
            if not self._of_model(model, _PRESENT):
                self._fail_all(model, queue)
                continue
            self._route(model, queue)
        self._announce()

    def watch(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Calls ``listener()`` (on the event loop) after every change of a phone's state and every
        move of a queue (a request queued, granted a phone or handed one back); returns the call that
        stops it. Listeners must be quick (the console's event stream only flags a refresh)."""
        self._watchers.append(listener)

        def stop() -> None:
            if listener in self._watchers:
                self._watchers.remove(listener)

        return stop

    def _announce(self) -> None:
        for listener in list(self._watchers):
            try:
                listener()
            except Exception:
                logger.exception("pool watcher failed")

    def _offers(
        self, model: str, waiters: Iterable[_Waiter], now: float
    ) -> Iterator[tuple[_Waiter, Route, float | None]]:
        """One round of routing: the waiters, oldest first, each with its router's answer, as long as
        a phone of the model is free, and for a wait the time by which to ask again
        (:meth:`_reask_by`). A phone named for one waiter is leased for the next ones, and a busy phone
        one chose to wait for is one request further away for the ones behind it. Reads only:
        :meth:`_route` grants what it names, :meth:`audit` checks that it names nothing."""
        phones = self._phones()
        keys = self._of_model(model, _SERVING)
        named: set[str] = set()
        ahead: collections.Counter[str] = collections.Counter()
        peers_ms = self._peers_prefill_ms(keys)
        queued = list(waiters)
        # the others count while they are queued: one whose wait ended (a timeout, a cancel) until it
        # leaves the queue (_withdraw), which routes again; so what a router sees changes only where
        # the pool routes again, and the audit asks what dispatching would
        others = len(queued) - 1
        for waiter in queued:
            if not any(self._free(k, phones[k], named) for k in keys):
                return
            if waiter.future.done():
                continue
            held_since = waiter.request.held_since
            # held back in this round, if at all: from the round's time
            request = dataclasses.replace(waiter.request, others_waiting=others, now=now,
                                          held_since=now if held_since is None else held_since)
            views = [self._view(k, phones[k], request, named=k in named, ahead=ahead[k], now=now,
                                peers_ms=peers_ms) for k in keys]
            choice = self._router.choose(request, views)
            reask = None
            if isinstance(choice, WaitFor):
                reask = self._reask_by(model, choice, views, ahead, now)
                ahead[choice.key] += 1
            elif choice is not None:
                named.add(choice)
            yield waiter, choice, reask

    def _reask_by(self, model: str, choice: WaitFor, views: Sequence[PhoneView],
                  ahead: collections.Counter[str], now: float) -> float:
        """When to route again a request that chose to wait (``choice``; ``views``: the phones as it
        saw them, ``ahead``: the waiters of the round before it, per phone): by its deadline, or
        earlier, the first time a busy phone it could wait for can no longer come by the deadline. A
        busy phone's expected wait (:meth:`_view`) shrinks as its request runs, until that request
        overruns: from then on it is ``REMAINING_FLOOR`` of an average request (plus one per waiter
        ahead), and its end moves later with the clock; a router that waits only for a phone expected
        by the deadline (``PrefixAware``) changes its mind then, not at the deadline."""
        service = self._service_s.get(model)
        if service is None:
            return choice.until
        slides = [choice.until - (REMAINING_FLOOR + ahead[v.key]) * service
                  for v in views if not v.free and v.wait_s is not None and now + v.wait_s <= choice.until]
        return min((t for t in slides if now < t < choice.until), default=choice.until)

    def _route(self, model: str, queue: collections.deque[_Waiter]) -> None:
        """Offers the free phones to the waiters, oldest first; grants what the router names, and asks
        again by the deadline of a wait it chose instead. A grant changes the queue the others weighed
        (``others_waiting``): rounds repeat until one grants nothing, so that no waiter that chose to
        wait while a granted one was still queued is left beside a free phone it would now take."""
        now = time.monotonic()
        again = True
        while again:  # only a choice to wait can change with the queue: again if one met a grant
            granted = waited = False
            for waiter, choice, reask in list(self._offers(model, queue, now)):
                if isinstance(choice, WaitFor):
                    if waiter.request.held_since is None:  # its deliberate wait is bounded from now
                        waiter.request = dataclasses.replace(waiter.request, held_since=now)
                    self._recheck_by(choice.until if reask is None else reask)
                    waited = True
                elif choice is not None:
                    self._grant(queue, waiter, choice)
                    granted = True
            again = granted and waited  # each round but the last grants a phone: bounded by the free phones

    def _grant(self, queue: collections.deque[_Waiter], waiter: _Waiter, key: str) -> None:
        queue.remove(waiter)
        self._leased[key] = waiter.request_id
        self._leased_at[key] = time.monotonic()
        self._granted[key] = waiter  # until its request claims it (or gives it back)
        waiter.future.set_result(key)

    def _recheck_by(self, when: float) -> None:
        """Routes again at ``when`` (time.monotonic()), a router's WaitFor deadline."""
        pending = self._pending_recheck()
        if pending is not None and pending <= when:
            return
        if self._recheck is not None:
            self._recheck.cancel()
        delay = max(0.0, when - time.monotonic()) + RECHECK_SLACK_S
        self._recheck_at = when
        self._recheck = asyncio.get_running_loop().call_later(delay, self._recheck_due)

    def _pending_recheck(self) -> float | None:
        """When the pool routes again by itself (time.monotonic()); None when nothing is scheduled."""
        handle = self._recheck
        return self._recheck_at if handle is not None and not handle.cancelled() else None

    def _recheck_due(self) -> None:
        self._recheck = self._recheck_at = None
        self._dispatch()

    def _no_phone(self, model: str) -> NoPhoneAvailable:
        return NoPhoneAvailable(f"No phone serves `{model}` right now (unplugged or adb server gone); "
                                "retry later.")

    def _fail_all(self, model: str, queue: collections.deque[_Waiter]) -> None:
        logger.warning("no phone serves %s any more: %d queued request(s) fail", model, len(queue))
        while queue:
            waiter = queue.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(self._no_phone(model))

    # -- leasing ------------------------------------------------------------------------------

    def _retry_after(self, model: str) -> float:
        """Seconds until a queue slot is likely free: one phone finishing its request."""
        phones = max(1, len(self._of_model(model, _SERVING)))
        return min(RETRY_AFTER_MAX_S, max(1.0, self._service_s.get(model, 1.0) / phones))

    def _enqueue(self, params: GenerationParams, exclude: frozenset[str], *, front: bool) -> _Waiter:
        """A waiter in its model's queue, granted a phone already when an idle one may serve it."""
        model = params.model
        self._note_served()
        if not self._of_model(model, _PRESENT):
            if front or model in self._served:  # it was served: its phones may come back
                raise self._no_phone(model)
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        now = time.monotonic()  # a deliberate wait ends by half the queue timeout (read again by _wait below)
        request = RouteRequest(params.request_id, model, exclude, now, params.prompt_ids,
                               wait_until=now + self._settings.queue_timeout_s / 2)
        waiter = _Waiter(request, asyncio.get_running_loop().create_future())
        queue = self._queues[model]
        if front:  # a retry: it waited its turn already
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        self._dispatch()  # an idle phone it may use is its own now, however long the queue
        if not front and not waiter.future.done() and self.queue_depth(model) > self._settings.max_queue:
            self._take_a_free_phone(queue, waiter)  # it would rather wait for a busy one: no room for that
        if not front and not waiter.future.done() and self.queue_depth(model) > self._settings.max_queue:
            self._withdraw(waiter)
            raise Overloaded(
                f"The queue for `{model}` is full ({self._settings.max_queue} waiting); retry later.",
                retry_after=self._retry_after(model),
            )
        ticket = admission.get()
        if ticket is not None and not front:  # queued or granted: no status code can refuse it now
            ticket.admitted()
        return waiter

    def _take_a_free_phone(self, queue: collections.deque[_Waiter], waiter: _Waiter) -> None:
        """Grants the waiter the free phone its router names when it may not wait for a busy one."""
        phones, keys, now = self._phones(), self._of_model(waiter.model, _SERVING), time.monotonic()
        impatient = dataclasses.replace(waiter.request, patient=False, now=now)
        peers_ms = self._peers_prefill_ms(keys)
        views = [self._view(k, phones[k], impatient, now=now, peers_ms=peers_ms) for k in keys]
        choice = self._router.choose(impatient, views)
        if isinstance(choice, str):
            self._grant(queue, waiter, choice)
            self._dispatch()  # one fewer waiting: what the others weighed changed

    def _withdraw(self, waiter: _Waiter) -> None:
        """The waiter leaves without claiming a phone: out of the queue, and a phone granted to it
        meanwhile (its task had not woken up yet) goes back to the pool."""
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            key = future.result()
            if self._granted.get(key) is waiter:
                del self._granted[key]
                self._release(key, waiter.request_id)
            return
        future.cancel()
        with contextlib.suppress(ValueError):
            self._queues[waiter.model].remove(waiter)
            self._dispatch()  # the others weighed its wait (``others_waiting``): route them again

    async def _wait(self, waiter: _Waiter) -> str:
        """The key granted to the waiter; NoPhoneAvailable after the queue timeout."""
        timeout = self._settings.queue_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await waiter.future
        except TimeoutError:
            raise NoPhoneAvailable(
                f"No phone serving `{waiter.model}` became free within {timeout:g} s.", code="queue_timeout",
                retry_after=self._retry_after(waiter.model),
            ) from None

    @contextlib.asynccontextmanager
    async def _lease(self, params: GenerationParams, exclude: frozenset[str], *, front: bool) -> AsyncIterator[str]:
        """A phone leased to the request for the block: the only way a phone is taken, and on every
        way out (a timeout, a cancel, the block's end or error) it is given back."""
        waiter = self._enqueue(params, exclude, front=front)
        try:
            key = await self._wait(waiter)
        except BaseException:
            self._withdraw(waiter)  # whatever ended the wait, a phone granted meanwhile goes back
            raise
        self._granted.pop(key, None)  # claimed: from here on the block's end releases it
        try:
            yield key
        finally:
            self._release(key, params.request_id)

    def _release(self, key: str, request_id: str) -> None:
        holder = self._leased.get(key)
        if holder != request_id:  # never free a phone someone else holds
            logger.error("request %s gives back phone %s, leased to %s", request_id, key, holder)
            return
        del self._leased[key]
        self._leased_at.pop(key, None)
        self._idle_since[key] = time.monotonic()
        self._dispatch()

    def _observe_service(self, model: str, seconds: float) -> None:
        old = self._service_s.get(model)
        self._service_s[model] = seconds if old is None else old + SERVICE_EWMA * (seconds - old)
        self._dispatch()  # every busy phone's expected wait changed with it: a wait chosen on it may not hold

    # -- Backend contract ---------------------------------------------------------------------

    async def generate(self, params: GenerationParams) -> AsyncIterator[Event]:  # type: ignore[override]
        attempts = _Attempts(params.request_id)
        while True:
            async with self._lease(params, frozenset(attempts.failed_on), front=attempts.front) as key:
                attempts.front = True  # whatever happens next, a new attempt keeps its place at the head
                phone = self._claimed_phone(key, attempts)
                if phone is None:
                    continue  # it went away before the request started: back to the queue
                t0 = time.monotonic()
                events = self._run_on(key, phone, params)
                try:
                    async for event in events:
                        attempts.streamed |= isinstance(event, Tokens)
                        if isinstance(event, Finished):
                            self._observe_service(params.model, time.monotonic() - t0)
                        yield event
                        if isinstance(event, Finished):
                            return
                    return
                except BackendError as exc:
                    if not attempts.retry_after(key, exc):
                        raise
                finally:
                    await self._let_go(params.request_id, events)

    def _claimed_phone(self, key: str, attempts: _Attempts) -> PoolPhone | None:
        """The phone leased to the request, or None when it went away between grant and claim."""
        phone = self._phones().get(key)
        if phone is not None and phone.state is PhoneState.READY:
            return phone
        attempts.went_away(key)
        return None

    def _run_on(self, key: str, phone: PoolPhone, params: GenerationParams) -> AsyncIterator[Event]:
        """The request's events on its leased phone; running (and cancellable) until :meth:`_let_go`."""
        self._running[params.request_id] = (key, phone)
        return phone.generate(params)

    async def _let_go(self, request_id: str, events: AsyncIterator[Event]) -> None:
        """Closes the request's events (cancelling it on the phone if it has not finished); it stays
        running, and cancellable, until the phone has let go."""
        try:
            await events.aclose()  # type: ignore[attr-defined]
        finally:
            self._running.pop(request_id, None)

    async def cancel(self, request_id: str) -> None:
        running = self._running.get(request_id)
        if running is not None:
            await running[1].cancel(request_id)

    def models(self) -> list[ModelInfo]:
        return merge_models(self._phones())

    def health(self) -> list[PhoneHealth]:
        return [h for phone in self._phones().values() for h in phone.health()]

    def queue_depth(self, model: str | None = None) -> int:
        """Requests waiting for a phone (of one model, or of all)."""
        queues = [self._queues[model]] if model else list(self._queues.values())
        return sum(1 for q in queues for w in q if not w.future.done())

    def queue_wait_s(self, model: str) -> float:
        """How long the oldest request still waiting for a phone of ``model`` has waited (0: none)."""
        enqueued = [w.request.enqueued for w in self._queues.get(model, ()) if not w.future.done()]
        return max(0.0, time.monotonic() - min(enqueued)) if enqueued else 0.0

    def running(self) -> int:
        """Requests on a phone right now."""
        return len(self._running)

    def leased(self) -> int:
        """Phones held by a request (running on it, or granted to it and about to run)."""
        return len(self._leased)

    def audit(self) -> list[str]:
        """What is wrong with the pool's bookkeeping, in words; empty when it is sound. Holds whenever
        the event loop switches tasks, so tests assert it under load:

        * every leased phone is held by the request running on it, or granted to a waiter whose task
          has not woken up yet (so at rest, leases held == requests running);
        * every running request holds the lease of its phone;
        * no request waits while an idle phone it may use is free, unless its router chose to wait for a
          busy phone (``WaitFor``) and the pool will ask again by the time that choice may change
          (:meth:`_reask_by`: the deadline the router named, or earlier when a busy phone it could wait
          for can no longer come by then), or that time has just passed and its recheck is due. The
          routing round is the pool's own (:meth:`_offers`, for the same moment: ``RouteRequest.now``),
          so the audit asks the router exactly what dispatching would. (Not foreseen: while a busy
          phone's request runs its expected wait shrinks, an older waiter may move to it and a younger
          one then see its phones further away; the storm of tests/scheduling/test_pool_leases.py has
          not met it since, and such a request gets its phone at the next recheck or event.)
        """
        problems: list[str] = []
        for key, rid in self._leased.items():
            waiter = self._granted.get(key)
            if waiter is not None:
                future = waiter.future
                if waiter.request_id != rid or not future.done() or future.cancelled() or (
                    future.exception() is not None or future.result() != key
                ):
                    problems.append(f"phone {key} is leased to {rid} but granted to an unresolved waiter")
            elif self._running.get(rid, ("",))[0] != key:
                problems.append(f"phone {key} is leased to {rid}, which neither runs on it nor was granted it")
        for rid, (key, _) in self._running.items():
            if self._leased.get(key) != rid:
                problems.append(f"request {rid} runs on phone {key} without holding its lease")
        problems += [f"granted phone {key} is not leased" for key in self._granted if key not in self._leased]
        now = time.monotonic()
        recheck = self._pending_recheck()
        for model, queue in self._queues.items():
            for waiter, choice, reask in self._offers(model, queue, now):
                if isinstance(choice, WaitFor):
                    if recheck is None or recheck > (choice.until if reask is None else reask):
                        problems.append(f"{waiter.request_id} waits for busy phone {choice.key} beside a "
                                        f"free one, and nothing asks again by its deadline ({choice.until:.3f}; "
                                        f"now {now:.3f}, held back since {waiter.request.held_since}, "
                                        f"next routing round {recheck})")
                elif choice is not None and (recheck is None or recheck > now):
                    problems.append(f"phone {choice} is idle while {waiter.request_id}, which may use it, "
                                    "waits")
        return problems

    async def aclose(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = self._recheck_at = None
        for queue in self._queues.values():
            for waiter in queue:
                waiter.future.cancel()
            queue.clear()
        await self._source.aclose()


def default_router(settings: Settings) -> Router:
    """``PrefixAware`` with ``state_reuse on`` (its wait for a busy phone at most ``route_wait_max_s``
    and half the queue timeout, so that a deliberate wait never ends in a 503), ``IdleLongest`` off;
    inside ``ThermalAware`` with ``thermal_routing on`` (drained phones hidden, cooler ones first)."""
    inner: Router = IdleLongest() if settings.state_reuse == "off" else PrefixAware(
        min(settings.route_wait_max_s, settings.queue_timeout_s / 2))
    if settings.thermal_routing == "on":
        return ThermalAware(inner, margin_c=settings.thermal_prefer_margin_c)
    return inner


async def build_backend(settings: Settings) -> PhonePool:
    """The app's backend: an ``AdbFleet`` over the configured adb servers behind a ``PhonePool``."""
    from server.backends.adb.fleet import AdbFleet

    pool = PhonePool(settings, lambda phone_changed: AdbFleet(settings, on_change=phone_changed))
    await pool.start()
    return pool
