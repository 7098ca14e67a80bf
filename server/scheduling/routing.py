"""Routing: which phone a queued request gets. The pool (server/scheduling/pool.py) keeps the queue
mechanics (FIFO per model, bounds, timeouts, leases, retries) and asks a :class:`Router` for each
waiting request, oldest first, whenever a phone may have become free.

A router sees a read-only picture: the request (:class:`RouteRequest`) and the phones serving its
model (:class:`PhoneView`, one per phone that is ready or busy, free or not, as seen *for this
request*: what it would reuse of this prompt, how long until it could start it), and answers with a
:data:`Route`: the key of a free phone, :class:`WaitFor` a busy one (a deliberate, bounded wait
beside a free phone it may use), or ``None`` (no free phone it may use). The pool asks again on the
next change (a phone handed back, a phone's state changed, a new request) and, for a ``WaitFor``, by
its deadline at the latest. A router holds no state of its own about phones or requests: what it
decides from belongs in the views, so that a policy is tested by building views.

Policies to come add fields here, not new arguments: a phone's telemetry (thermal status) for
thermal-aware routing, for instance.

* :class:`IdleLongest`: of the free phones, the one idle longest (docs/pool.md, "Scheduling"); the
  pool's policy with ``state_reuse off``.
* :class:`PrefixAware`: the lowest expected time to first token, counting what each phone would
  reuse of the prompt, and waiting (bounded) for a busy phone when that is faster
  (docs/state-reuse.md, "Routing"); the pool's policy with ``state_reuse on``.
* :class:`ThermalAware`: around either one, with ``thermal_routing on``: drained phones (too hot, low
  battery) are hidden and, of the free phones, only the coolest shown (docs/capacity.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from server.backends.base import PhoneState

# a prompt token's cost on a phone that has not measured its own yet: 0.7 decode steps at 22.7 tok/s
# (the model card's fp16 rate; the simulated phone's timing model at speed 1, server/sim/simconfig.py)
DEFAULT_PREFILL_MS_PER_TOKEN = 0.7 / 22.7 * 1000


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """A request waiting for a phone, as a router sees it."""

    request_id: str
    model: str
    avoid: frozenset[str]  # phones (keys) that failed this request
    enqueued: float  # time.monotonic() when it joined the queue (a retry: when it joined it again)
    prompt_ids: Sequence[int] = ()  # the whole prompt; never modified
    # it may wait for a busy phone while a free one it may use is there; the pool says False when its
    # queue is full: a request the queue cannot hold takes a free phone at once or is refused
    patient: bool = True
    # time.monotonic() when a router first chose a busy phone for it over a free one (WaitFor); while it
    # never was, the pool passes the time of the routing round (None: now). A deliberate wait is
    # bounded from then, however long the queue took before
    held_since: float | None = None
    # requests of its model waiting for a phone besides it: under such load a phone's time is everyone's
    others_waiting: int = 0
    # time.monotonic() by which any deliberate wait ends, however recently it began: half its queue
    # timeout after it joined the queue, so that waiting by choice never ends in a queue timeout (None:
    # no such bound)
    wait_until: float | None = None
    # time.monotonic() of the routing round, the time the views were made for (phones' waits): a router
    # decides for that moment, as the pool's audit asks it again (None: the router's own clock)
    now: float | None = None


@dataclass(frozen=True, slots=True)
class PhoneView:
    """One phone serving the request's model, as a router sees it for that request."""

    key: str  # "<adb server>/<serial>", as the pool and /v1/devices name it
    state: PhoneState  # READY or BUSY
    leased: bool  # held by a request (running on it, or granted to one about to run)
    idle_since: float  # time.monotonic() when a request last handed it back; 0.0 if none ever did
    reusable: int = 0  # prompt tokens of this request it would not process again (live state, checkpoint)
    # expected seconds until it could start this request: 0 when free; for a phone leased to another
    # request, the rest of that request (the pool's average request time minus the time it has held
    # the phone, at least half an average) plus one average request per waiter ahead that waits for it;
    # None when the pool cannot tell (no request of the model finished yet, a phone busy outside a lease)
    wait_s: float | None = 0.0
    prefill_ms_per_token: float | None = None  # its measured cost of one prompt token; None: not measured
    # its health (server/backends/adb/telemetry.py): Android's thermal status 0-6 and its temperature
    # (None: unknown), and why it gets no new requests ("thermal", "battery"; None: it gets them)
    thermal_status: int | None = None
    temperature_c: float | None = None
    drained: str | None = None

    @property
    def free(self) -> bool:
        """Ready and held by nobody: the only phones a router may name."""
        return self.state is PhoneState.READY and not self.leased


@dataclass(frozen=True, slots=True)
class WaitFor:
    """The request waits for busy phone ``key``, though a free phone it may use is there, until
    ``until`` (time.monotonic()) at the latest: the pool asks the router again by then."""

    key: str
    until: float


# the key of a free phone; a deliberate, bounded wait for a busy one; or None: no free phone it may use
Route = str | WaitFor | None


class Router(Protocol):
    """Chooses a phone for a request. ``phones`` are the phones that serve the request's model (ready
    or busy), in the pool's order; the answer is the key of one whose ``free`` is true, ``None`` when
    the request may use none of them, or a :class:`WaitFor` (a busy phone) when it may use a free one
    but rather waits for a busy one, never past the ``until`` it names. Called on the event loop,
    often: it must not block or await."""

    def choose(self, request: RouteRequest, phones: Sequence[PhoneView]) -> Route: ...


class IdleLongest:
    """Of the free phones the request may use, the one idle longest, so that load spreads over all
    phones. A phone that failed this request is avoided while another phone serves the model (busy or
    not: the request rather waits for that one); when every phone serving the model failed it, any of
    them will do (with one phone, the retry goes to that phone once it is back)."""

    def choose(self, request: RouteRequest, phones: Sequence[PhoneView]) -> Route:
        usable = [p for p in phones if p.free and _may_use(request, p, phones)]
        if not usable:
            return None
        return min(usable, key=lambda p: p.idle_since).key  # the first of equals: the pool's order breaks ties


class PrefixAware:
    """The phone with the lowest expected time to first token: its wait (0 when free) plus the prompt
    tokens it would process (the prompt less what it would reuse) times its cost per prompt token
    (measured, else ``prefill_ms_per_token``). Free phones within :data:`EQUAL_WITHIN` of the fastest
    count as equals (measured costs of like phones differ by noise), and of equals the free phone idle
    longest wins (then the pool's order), so that requests with nothing to reuse spread over the
    phones as with :class:`IdleLongest`.

    Under load (``RouteRequest.others_waiting``) each phone is weighed at its expected time to first
    token plus the prompt processing it would spend beyond the least any phone needs, times the
    requests waiting per phone: a free phone that would process the whole prompt again costs that
    time to each request behind it (and, in a busy farm, to the conversations whose state it holds),
    so a request rather waits, bounded, for the phone holding its conversation. Alone in the queue, a
    request weighs its own time only.

    A busy phone wins only when it is faster than the best free phone by more than that margin and
    its expected wait ends within ``wait_max_s`` of the first time the request was held back for a
    busy phone (``RouteRequest.held_since``; now, the first time), and by ``RouteRequest.wait_until``
    (half its queue timeout); the request then waits for it (:class:`WaitFor`) until that deadline at
    the latest, and takes the best free phone after it.
    Waiting never starves anyone: the pool keeps asking oldest first, later requests take free phones
    meanwhile, and a wait the pool counts ahead makes a busy phone slower for the requests behind it,
    so that many conversations at once spread over the phones instead of queueing for one. A phone
    that failed this request is avoided as :class:`IdleLongest` avoids it."""

    def __init__(
        self,
        wait_max_s: float,
        *,
        prefill_ms_per_token: float = DEFAULT_PREFILL_MS_PER_TOKEN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wait_max_s = wait_max_s
        self.prefill_ms_per_token = prefill_ms_per_token
        self._clock = clock

    def prompt_s(self, request: RouteRequest, phone: PhoneView) -> float:
        """Seconds ``phone`` would spend on this request's prompt (what it would not reuse)."""
        prompt = len(request.prompt_ids)
        todo = prompt - min(max(phone.reusable, 0), prompt)
        ms = phone.prefill_ms_per_token
        if ms is None:
            ms = self.prefill_ms_per_token
        return todo * ms / 1000.0

    def expected_ttft_s(self, request: RouteRequest, phone: PhoneView) -> float | None:
        """Seconds until this request's first token on ``phone`` (None: its wait is unknown)."""
        wait = 0.0 if phone.free else phone.wait_s
        if wait is None:
            return None
        return wait + self.prompt_s(request, phone)

    def cost_s(self, request: RouteRequest, phone: PhoneView, least_prompt_s: float, phones: int) -> float | None:
        """What the choice weighs: the expected time to first token, plus, while other requests wait
        (``others_waiting``), the prompt processing it would cost beyond the least any phone needs
        (``least_prompt_s``) once for each request waiting per phone (of ``phones``): the time those
        behind it would wait for it, so that the choice keeps the sum of everyone's waits low."""
        ttft = self.expected_ttft_s(request, phone)
        if ttft is None or not request.others_waiting:
            return ttft
        return ttft + (self.prompt_s(request, phone) - least_prompt_s) * request.others_waiting / max(1, phones)

    def choose(self, request: RouteRequest, phones: Sequence[PhoneView]) -> Route:
        usable = [p for p in phones if _may_use(request, p, phones)]
        if not any(p.free for p in usable):
            return None
        least = min(self.prompt_s(request, p) for p in usable)
        free = [(self.cost_s(request, p, least, len(phones)) or 0.0, p) for p in usable if p.free]
        fastest = min(ttft for ttft, _ in free)
        equals = [(ttft, p) for ttft, p in free if _equal(ttft, fastest)]
        best_s, best = min(equals, key=lambda c: c[1].idle_since)  # the first of equals: the pool's order
        now = self._clock() if request.now is None else request.now
        deadline = (now if request.held_since is None else request.held_since) + self.wait_max_s
        if request.wait_until is not None:
            deadline = min(deadline, request.wait_until)
        if request.patient and now < deadline:
            faster = [
                (ttft, p)
                for p in usable
                if not p.free and p.wait_s is not None and now + p.wait_s <= deadline
                and (ttft := self.cost_s(request, p, least, len(phones))) is not None and not _equal(best_s, ttft)
                and ttft < best_s
            ]
            if faster:
                return WaitFor(min(faster, key=lambda c: c[0])[1].key, deadline)
        return best.key


EQUAL_WITHIN = 0.1  # expected times to first token this close (relative) count as equal


def _equal(a: float, b: float) -> bool:
    return abs(a - b) <= EQUAL_WITHIN * max(a, b)


def _may_use(request: RouteRequest, phone: PhoneView, phones: Sequence[PhoneView]) -> bool:
    return phone.key not in request.avoid or all(p.key in request.avoid for p in phones)


class ThermalAware:
    """Thermal-aware scheduling around another policy (``inner``; docs/capacity.md, "Phone health").

    * A drained phone (``PhoneView.drained``: too hot, or low on battery while not charging) is hidden
      from the inner policy: it gets no new request, and no request waits for it. Requests running on
      it finish. When the only phones a request has not failed on are drained, it may go back to one
      it failed on rather than to a drained one.
    * Of the free phones the request may use, one is passed over when another is cooler (a lower
      thermal status, or the same and more than ``margin_c`` degrees cooler) and would reuse as much
      of the prompt: cooler phones first, but never at the price of a prefix a warmer phone holds
      (state reuse). A phone without a reading counts as status NONE and is never passed over for its
      degrees (nothing is known against it). Busy phones are shown as they are (the inner policy may
      wait for one).

    The inner policy chooses among what is left. Holds no state: the drain decision and its
    hysteresis are the phone's (server/backends/adb/telemetry.py), read from the views."""

    def __init__(self, inner: Router, *, margin_c: float = 2.0) -> None:
        self.inner = inner
        self.margin_c = margin_c

    def choose(self, request: RouteRequest, phones: Sequence[PhoneView]) -> Route:
        serving = [p for p in phones if p.drained is None]
        free = [p for p in serving if p.free and _may_use(request, p, serving)]
        passed_over = {p.key for p in free if any(q.reusable >= p.reusable and self.cooler(q, p) for q in free)}
        return self.inner.choose(request, [p for p in serving if p.key not in passed_over])

    def cooler(self, a: PhoneView, b: PhoneView) -> bool:
        """Whether ``a`` runs cooler than ``b``: a lower thermal status, or the same and more than
        ``margin_c`` degrees cooler (an unknown status counts as NONE; unknown degrees never compare)."""
        if _status(a) != _status(b):
            return _status(a) < _status(b)
        return a.temperature_c is not None and b.temperature_c is not None and (
            b.temperature_c > a.temperature_c + self.margin_c)


def _status(phone: PhoneView) -> int:
    return phone.thermal_status if phone.thermal_status is not None else 0
