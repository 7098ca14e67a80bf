"""Routing (server/scheduling/routing.py): policies alone (a request and phone views in, a key out; no
pool, no queue), then the seam: the pool asks the router it was given and grants what it names.
The prefix-aware policy with the pool and its doubles: test_pool_prefix.py."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.backends.base import PhoneState
from server.errors import NoPhoneAvailable
from server.scheduling.routing import (
    DEFAULT_PREFILL_MS_PER_TOKEN,
    EQUAL_WITHIN,
    IdleLongest,
    PhoneView,
    PrefixAware,
    Router,
    RouteRequest,
    WaitFor,
)
from tests.scheduling.pool_doubles import make_pool, run

READY, BUSY = PhoneState.READY, PhoneState.BUSY


def request(rid: str = "r", avoid: Sequence[str] = ()) -> RouteRequest:
    return RouteRequest(rid, "m", frozenset(avoid), enqueued=0.0, prompt_ids=[1, 2, 3])


def view(key: str, state: PhoneState = READY, *, leased: bool = False, idle_since: float = 0.0) -> PhoneView:
    return PhoneView(key, state, leased, idle_since)


# Where nothing is reused anywhere (every view's ``reusable`` is 0, one cost per prompt token), the
# prefix-aware policy chooses as IdleLongest does: these tests run against both.
BOTH = pytest.mark.parametrize("router", [IdleLongest(), PrefixAware(5.0, clock=lambda: 0.0)],
                               ids=["idle-longest", "prefix-aware"])


@BOTH
def test_the_phone_idle_longest_is_chosen(router: Router) -> None:
    phones = [view("a", idle_since=3.0), view("b", idle_since=1.0), view("c", idle_since=2.0)]
    assert router.choose(request(), phones) == "b"


@BOTH
def test_a_phone_never_handed_back_counts_as_idle_longest_and_ties_keep_the_pool_order(router: Router) -> None:
    phones = [view("a", idle_since=5.0), view("b"), view("c")]
    assert router.choose(request(), phones) == "b"


@BOTH
def test_busy_and_leased_phones_are_never_chosen(router: Router) -> None:
    phones = [view("busy", BUSY), view("granted", leased=True), view("free", idle_since=9.0)]
    assert router.choose(request(), phones) == "free"
    assert router.choose(request(), phones[:2]) is None


@BOTH
def test_a_phone_that_failed_the_request_is_avoided_while_another_serves_the_model(router: Router) -> None:
    phones = [view("failed"), view("other", idle_since=9.0)]
    assert router.choose(request(avoid=["failed"]), phones) == "other"


@BOTH
def test_the_request_waits_for_a_busy_phone_rather_than_go_back_to_the_one_that_failed_it(router: Router) -> None:
    phones = [view("failed"), view("other", BUSY)]
    assert router.choose(request(avoid=["failed"]), phones) is None


@BOTH
def test_when_every_phone_serving_the_model_failed_the_request_any_free_one_will_do(router: Router) -> None:
    assert router.choose(request(avoid=["only"]), [view("only")]) == "only"
    phones = [view("a", idle_since=2.0), view("b", idle_since=1.0)]
    assert router.choose(request(avoid=["a", "b"]), phones) == "b"


@BOTH
def test_no_phones_no_choice(router: Router) -> None:
    assert router.choose(request(), []) is None


def test_both_policies_are_routers() -> None:
    for router in (IdleLongest(), PrefixAware(5.0)):
        chosen: Router = router
        assert chosen.choose(request(), [view("a")]) == "a"


# --------------------------------------------------------------------------- properties

keys = st.sampled_from(["p0", "p1", "p2", "p3", "p4"])
views = st.lists(
    st.builds(view, keys, st.sampled_from([READY, BUSY]), leased=st.booleans(),
              idle_since=st.sampled_from([0.0, 1.0, 2.0, 3.0])),
    max_size=5, unique_by=lambda v: v.key,
)
avoids = st.lists(st.frozensets(keys, max_size=3), min_size=1, max_size=5)


@BOTH
@given(views, avoids)
def test_the_choice_is_the_free_phone_idle_longest_among_those_the_request_may_use(
    router: Router, phones: list[PhoneView], avoid_sets: list[frozenset[str]]
) -> None:
    for avoid in avoid_sets:
        every_one_failed_it = all(p.key in avoid for p in phones)
        usable = [p for p in phones if p.free and (p.key not in avoid or every_one_failed_it)]
        chosen = router.choose(request(avoid=avoid), phones)
        if not usable:
            assert chosen is None
        else:
            assert chosen == next(p.key for p in usable if p.idle_since == min(u.idle_since for u in usable))


def offer_oldest_first(router: Router, phones: list[PhoneView], waiters: list[frozenset[str]]) -> dict[int, str]:
    """How the pool uses a router: each waiter in FIFO order is offered what is still free."""
    granted: dict[int, str] = {}
    for i, avoid in enumerate(waiters):
        key = router.choose(request(f"r{i}", avoid), phones)
        assert not isinstance(key, WaitFor)  # nothing to reuse: nothing worth waiting for
        if key is not None:
            granted[i] = key
            phones = [PhoneView(p.key, p.state, True, p.idle_since) if p.key == key else p for p in phones]
    return granted


def each_phone_to_the_oldest_waiter(phones: list[PhoneView], waiters: list[frozenset[str]]) -> dict[int, str]:
    """The rule as docs/pool.md states it (and as the pool applied it before routing had a module):
    the free phones, idle longest first, each go to the oldest waiter that may use it."""
    granted: dict[int, str] = {}
    for phone in sorted((p for p in phones if p.free), key=lambda p: p.idle_since):
        for i, avoid in enumerate(waiters):
            if i not in granted and (phone.key not in avoid or all(p.key in avoid for p in phones)):
                granted[i] = phone.key
                break
    return granted


@BOTH
@given(views, avoids)
def test_offering_phones_oldest_waiter_first_gives_each_free_phone_to_the_oldest_waiter_that_may_use_it(
    router: Router, phones: list[PhoneView], waiters: list[frozenset[str]]
) -> None:
    assert offer_oldest_first(router, phones, waiters) == each_phone_to_the_oldest_waiter(phones, waiters)


# --------------------------------------------------------------------------- prefix-aware, alone

PROMPT = list(range(100))  # 100 tokens: 3.08 s to process at the default cost (30.8 ms a token)
MS = DEFAULT_PREFILL_MS_PER_TOKEN


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def prefix_aware(wait_max_s: float = 5.0, clock: Clock | None = None) -> PrefixAware:
    return PrefixAware(wait_max_s, clock=clock or Clock())


def asking(rid: str = "r", *, enqueued: float = 0.0, avoid: Sequence[str] = (), patient: bool = True,
           prompt: Sequence[int] = PROMPT, held_since: float | None = None,
           wait_until: float | None = None) -> RouteRequest:
    return RouteRequest(rid, "m", frozenset(avoid), enqueued, prompt, patient, held_since, wait_until=wait_until)


def phone(key: str, *, busy: bool = False, reusable: int = 0, wait_s: float | None = 0.0,
          ms: float | None = None, idle_since: float = 0.0) -> PhoneView:
    """A free phone, or (``busy``) one leased to a request that holds it ``wait_s`` seconds more."""
    return PhoneView(key, BUSY if busy else READY, busy, idle_since, reusable, wait_s if busy else 0.0, ms)


def test_the_free_phone_holding_the_prefix_is_chosen_over_the_one_idle_longest() -> None:
    phones = [phone("empty", idle_since=1.0), phone("holds", reusable=90, idle_since=5.0)]
    assert prefix_aware().choose(asking(), phones) == "holds"


def test_the_phone_that_would_process_fewest_tokens_wins_at_its_own_measured_cost() -> None:
    phones = [phone("a", reusable=20), phone("b", reusable=80), phone("c", reusable=50)]
    assert prefix_aware().choose(asking(), phones) == "b"
    # a phone that processes prompts 30x faster wins although it holds nothing
    phones = [phone("slow", reusable=50, ms=30.0), phone("fast", ms=1.0)]
    assert prefix_aware().choose(asking(), phones) == "fast"
    # a phone that has not measured its cost is taken at the default one
    phones = [phone("unmeasured", reusable=10), phone("measured", ms=MS * 0.7)]
    assert prefix_aware().choose(asking(), phones) == "measured"
    assert prefix_aware().choose(asking(), [phone("unmeasured", reusable=45), phones[1]]) == "unmeasured"


def test_under_load_a_request_waits_for_its_conversation_rather_than_cost_a_free_phone_its_whole_prompt() -> None:
    """300 prompt tokens: 9.2 s on the free phone; 30 on the busy phone that holds the other 270, 8.5 s
    away (9.4 s: not faster). Alone in the queue the request takes the free phone; with others
    waiting, the free phone also costs them the 8.3 s of phone time beyond the 0.9 s the busy phone
    needs, and the request waits for the busy phone (bounded)."""
    prompt = list(range(300))
    phones = [phone("empty"), phone("holds", busy=True, reusable=270, wait_s=8.5)]
    assert prefix_aware(30.0).choose(asking(prompt=prompt), phones) == "empty"
    under_load = dataclasses.replace(asking(prompt=prompt), others_waiting=3)
    assert prefix_aware(30.0).choose(under_load, phones) == WaitFor("holds", 30.0)
    # still bounded: a wait past the bound is not started
    assert prefix_aware(8.0).choose(under_load, phones) == "empty"


def test_phones_within_a_tenth_of_the_fastest_are_equals_and_the_one_idle_longest_wins() -> None:
    """Like phones measure slightly different costs (noise): counted as equals, unrelated requests
    spread over them instead of all going to the one that measured the lowest cost."""
    phones = [phone("cheapest", ms=MS * 0.95, idle_since=5.0), phone("idle", ms=MS * 1.04, idle_since=1.0)]
    assert prefix_aware().choose(asking(), phones) == "idle"
    phones = [phone("cheapest", ms=MS * 0.85, idle_since=5.0), phone("idle", ms=MS * 1.04, idle_since=1.0)]
    assert prefix_aware().choose(asking(), phones) == "cheapest"  # 18 % apart: not equals


def test_of_equally_fast_phones_the_one_idle_longest_then_the_pool_order() -> None:
    phones = [phone("a", reusable=50, idle_since=3.0), phone("b", reusable=50, idle_since=2.0),
              phone("c", reusable=50, idle_since=2.0), phone("d", reusable=40, idle_since=0.0)]
    assert prefix_aware().choose(asking(), phones) == "b"


def test_the_request_waits_for_the_busy_phone_holding_its_prompt_when_that_is_faster() -> None:
    # busy one more second, then 10 tokens (1.31 s) against 100 tokens on the free phone (3.08 s)
    phones = [phone("empty"), phone("holds", busy=True, reusable=90, wait_s=1.0)]
    assert prefix_aware(5.0).choose(asking(enqueued=0.0), phones) == WaitFor("holds", 5.0)


def test_an_idle_empty_phone_is_chosen_when_the_busy_one_would_take_longer() -> None:
    phones = [phone("empty"), phone("holds", busy=True, reusable=90, wait_s=3.0)]  # 3 + 0.31 > 3.08 s
    assert prefix_aware(5.0).choose(asking(), phones) == "empty"
    # no faster either way: equal is not worth a wait
    equal = [phone("empty", reusable=10), phone("holds", busy=True, reusable=100, wait_s=90 * MS / 1000)]
    assert prefix_aware(5.0).choose(asking(), equal) == "empty"


def test_a_wait_expected_to_end_after_the_bound_is_not_started() -> None:
    phones = [phone("empty"), phone("holds", busy=True, reusable=100, wait_s=2.5)]  # 2.5 s < 3.08 s
    assert prefix_aware(5.0).choose(asking(), phones) == WaitFor("holds", 5.0)
    assert prefix_aware(2.0).choose(asking(), phones) == "empty"  # but it would end past 2 s
    clock = Clock(3.0)  # asked again 3 s after it was first held back: 2.5 s more would end at 5.5 s
    assert prefix_aware(5.0, clock).choose(asking(held_since=0.0), phones) == "empty"
    # the bound counts from the first wait, not from joining the queue: a request that queued 60 s
    # without a free phone may still wait for the phone holding its prompt
    assert prefix_aware(5.0, Clock(60.0)).choose(asking(enqueued=0.0), phones) == WaitFor("holds", 65.0)


def test_the_wait_is_bounded_then_the_request_takes_another_phone() -> None:
    """The deadline is the request's (first held back + the bound), whatever the busy phone says:
    a request it runs over, the estimate still 0 s away, is given up at the deadline."""
    clock = Clock(10.0)
    router = prefix_aware(5.0, clock)
    request = asking(enqueued=2.0, held_since=10.0)
    for now, wait_s in ((10.0, 1.0), (11.0, 0.0), (14.99, 0.0)):
        clock.now = now
        phones = [phone("empty"), phone("holds", busy=True, reusable=90, wait_s=wait_s)]
        assert router.choose(request, phones) == WaitFor("holds", 15.0)
    clock.now = 15.0
    assert router.choose(request, phones) == "empty"


def test_a_busy_phone_whose_wait_the_pool_cannot_tell_is_not_waited_for() -> None:
    phones = [phone("empty"), phone("holds", busy=True, reusable=100, wait_s=None)]
    assert prefix_aware().choose(asking(), phones) == "empty"


def test_without_a_free_phone_it_may_use_the_request_just_waits() -> None:
    """A WaitFor is a wait beside a free phone; with none free the pool keeps the request queued."""
    phones = [phone("holds", busy=True, reusable=90, wait_s=1.0), phone("other", busy=True, wait_s=0.1)]
    assert prefix_aware().choose(asking(), phones) is None


def test_a_request_the_queue_cannot_hold_takes_a_free_phone_at_once() -> None:
    phones = [phone("empty"), phone("holds", busy=True, reusable=90, wait_s=1.0)]
    assert prefix_aware().choose(asking(patient=False), phones) == "empty"


def test_a_busy_phone_that_failed_the_request_is_not_waited_for() -> None:
    phones = [phone("empty"), phone("failed", busy=True, reusable=90, wait_s=0.5)]
    assert prefix_aware().choose(asking(avoid=["failed"]), phones) == "empty"
    # of two busy phones holding the prompt, the faster
    phones = [phone("empty"), phone("a", busy=True, reusable=90, wait_s=1.0),
              phone("b", busy=True, reusable=90, wait_s=0.5)]
    assert prefix_aware().choose(asking(), phones) == WaitFor("b", 5.0)


# random views: what a prefix-aware answer may be
aware_views = st.lists(
    st.builds(phone, keys, busy=st.booleans(), reusable=st.integers(-5, 120),
              wait_s=st.one_of(st.none(), st.floats(0, 8)), ms=st.one_of(st.none(), st.floats(0, 60)),
              idle_since=st.sampled_from([0.0, 1.0, 2.0])),
    max_size=5, unique_by=lambda v: v.key,
)


@given(aware_views, st.frozensets(keys, max_size=3), st.floats(0, 10), st.floats(0, 8), st.booleans(),
       st.none() | st.floats(0, 8), st.none() | st.floats(-1, 8))
# held back 1 s ago with a 5 s bound (until 7 s), but half its queue timeout is up 2 s from now: until 5 s
@example([phone("empty"), phone("holds", busy=True, reusable=90, wait_s=1.0)], frozenset(), 3.0, 5.0, True, 1.0, 2.0)
def test_a_prefix_aware_answer_is_the_fastest_free_phone_or_a_bounded_wait_for_a_faster_busy_one(
    phones: list[PhoneView], avoid: frozenset[str], now: float, wait_max_s: float, patient: bool,
    held_ago: float | None, wait_left: float | None
) -> None:
    router = prefix_aware(wait_max_s, Clock(now))
    held_since = None if held_ago is None else now - held_ago  # first held back that long ago
    wait_until = None if wait_left is None else now + wait_left  # half its queue timeout, from now
    request = asking(avoid=avoid, patient=patient, held_since=held_since, wait_until=wait_until)
    every_one_failed_it = all(p.key in avoid for p in phones)
    usable = [p for p in phones if p.key not in avoid or every_one_failed_it]
    free = [p for p in usable if p.free]
    ttft = {p.key: router.expected_ttft_s(request, p) for p in usable}
    chosen = router.choose(request, phones)
    if not free:
        assert chosen is None
        return
    fastest_free = min(ttft[p.key] or 0.0 for p in free)
    # free phones within a tenth of the fastest are equals: the one idle longest of them is the best
    equals = [p for p in free if (ttft[p.key] or 0.0) <= fastest_free / (1 - EQUAL_WITHIN)]
    best = min(equals, key=lambda p: p.idle_since)
    best_s = ttft[best.key] or 0.0
    if isinstance(chosen, WaitFor):
        waited = next(p for p in usable if p.key == chosen.key)
        assert not waited.free and waited.wait_s is not None and patient
        # bounded from when it was first held back, and by half its queue timeout (wait_until)
        bound = (now if held_since is None else held_since) + wait_max_s
        assert chosen.until == (bound if wait_until is None else min(bound, wait_until))
        assert now < chosen.until and now + waited.wait_s <= chosen.until
        # faster than the best free phone by more than a tenth, or not worth a wait
        assert (ttft[waited.key] or 0.0) < best_s * (1 - EQUAL_WITHIN)
    else:
        assert chosen == best.key


# --------------------------------------------------------------------------- prefix-aware, in a queue


SERVICE_S = 1.0  # a request's time on a phone
BOUND_S = 5.0
N_PHONES = 4


@dataclass
class MiniPool:
    """The pool's routing round (server/scheduling/pool.py ``_offers``) over phones that are free or
    busy, in virtual time: waiters oldest first, each told how many others wait (``others_waiting``),
    each phone's wait the rest of its request plus one request per waiter ahead that waits for it;
    rounds on every change, repeated until one grants nothing (a grant changes what the others
    weigh), and again when a waiter leaves; time passing alone only at the times the pool asks again
    for a wait (``PhonePool._reask_by``: its deadline, or when the phone waited for overruns its
    request so that it can no longer come in time). After each change, and whenever time has passed,
    :meth:`audit` asks the router again as ``PhonePool.audit`` does."""

    router: PrefixAware
    clock: Clock
    busy_since: dict[str, float | None] = field(
        default_factory=lambda: {f"p{i}": None for i in range(N_PHONES)})  # None: free
    idle_since: dict[str, float] = field(default_factory=lambda: {f"p{i}": 0.0 for i in range(N_PHONES)})
    queue: list[RouteRequest] = field(default_factory=list)
    reusable: dict[str, dict[str, int]] = field(default_factory=dict)  # request -> phone -> tokens
    granted: dict[str, str] = field(default_factory=dict)  # request -> phone
    order: list[str] = field(default_factory=list)  # grants, in order
    rechecks: list[float] = field(default_factory=list)  # when the pool asks again (for waits)
    routed_at: float = 0.0  # the time of the last round

    def views(self, request: RouteRequest, ahead: collections.Counter[str]) -> list[PhoneView]:
        now = self.clock.now
        return [
            PhoneView(k, READY if since is None else BUSY, since is not None, self.idle_since[k],
                      self.reusable[request.request_id][k],
                      0.0 if since is None else max(SERVICE_S - (now - since), SERVICE_S / 2) + ahead[k] * SERVICE_S,
                      MS)
            for k, since in self.busy_since.items()
        ]

    def free(self) -> list[str]:
        return [k for k, since in self.busy_since.items() if since is None]

    def round(self) -> None:
        while self.one_round():
            pass
        self.routed_at = self.clock.now
        self.audit()

    def one_round(self) -> bool:
        """Offers the free phones to the waiters, oldest first; True when it granted one."""
        ahead: collections.Counter[str] = collections.Counter()
        waited: set[str] = set()  # requests that chose to wait for a busy phone this round
        others = len(self.queue) - 1
        granted = False
        for request in list(self.queue):
            if not self.free():
                break
            views = self.views(request, ahead)
            choice = self.router.choose(dataclasses.replace(request, others_waiting=others), views)
            if isinstance(choice, WaitFor):
                if request.held_since is None:  # as the pool does: the wait is bounded from now
                    held = dataclasses.replace(request, held_since=self.clock.now)
                    self.queue[self.queue.index(request)] = request = held
                assert choice.key not in self.free() and choice.until == request.held_since + BOUND_S
                assert self.clock.now < choice.until  # bounded: never past its deadline
                self.rechecks.append(self.reask_by(choice, views))
                ahead[choice.key] += 1
                waited.add(request.request_id)
                continue
            assert choice in self.free()  # a free phone it may use exists: it gets one or waits by choice
            # FIFO: every older request still waiting chose, within its bound, to wait for a busy phone
            older = self.queue[: self.queue.index(request)]
            assert all(r.request_id in waited for r in older)
            self.queue.remove(request)
            self.busy_since[choice] = self.clock.now
            self.granted[request.request_id] = choice
            self.order.append(request.request_id)
            granted = True
        return granted

    def reask_by(self, choice: WaitFor, views: list[PhoneView]) -> float:
        """As ``PhonePool._reask_by``: the deadline, or the first time a busy phone that could be waited
        for, its expected wait no longer shrinking (half a request, plus one per waiter ahead), would
        end past it."""
        now = self.clock.now
        slides = [choice.until - (v.wait_s - max(SERVICE_S - (now - since), SERVICE_S / 2) + SERVICE_S / 2)
                  for v in views if (since := self.busy_since[v.key]) is not None and v.wait_s is not None
                  and now + v.wait_s <= choice.until]
        return min([t for t in slides if now < t < choice.until], default=choice.until)

    def audit(self) -> None:
        """As ``PhonePool.audit``, in two parts. With the clock of the last round, routing again grants
        nothing and every wait has a recheck by the time its choice may change (``reask_by``): every
        change of the queue or the phones was routed. Now: nobody waits beside a free phone past its
        deadline or without a recheck by then. (Between rechecks, time alone may change an answer the
        pool cannot foresee: a busy phone's wait shrinks while its request runs, an older waiter moves
        to it, and the phones a younger one sees are further away; that waits for the next recheck.)"""
        now = self.clock.now
        self.clock.now = self.routed_at
        try:
            self.check(strict=True)
        finally:
            self.clock.now = now
        self.check(strict=False)

    def check(self, *, strict: bool) -> None:
        recheck = min(self.rechecks, default=None)
        ahead: collections.Counter[str] = collections.Counter()
        now = self.clock.now
        for request in self.queue:
            if not self.free():
                break
            asking = dataclasses.replace(request, others_waiting=len(self.queue) - 1)
            views = self.views(request, ahead)
            choice = self.router.choose(asking, views)
            deliberate = request.held_since is not None and now < request.held_since + BOUND_S
            if not isinstance(choice, WaitFor):
                due = recheck is not None and recheck <= now
                assert due or (not strict and deliberate and recheck is not None
                               and recheck <= request.held_since + BOUND_S), (  # type: ignore[operator]
                    f"{request.request_id} waits, but would take free phone {choice}")
                return  # the recheck due (or coming) gives it
            assert request.held_since is not None and choice.until == request.held_since + BOUND_S
            assert now < choice.until and recheck is not None
            assert recheck <= (self.reask_by(choice, views) if strict else choice.until)
            ahead[choice.key] += 1

    def leave(self, index: int) -> None:
        """A waiter's client goes away (or its queue timeout ends its wait)."""
        if self.queue:
            self.queue.pop(index % len(self.queue))
            self.round()

    def arrive(self, rid: str, reusable: Sequence[int], prompt: Sequence[int] = PROMPT) -> None:
        self.queue.append(RouteRequest(rid, "m", frozenset(), self.clock.now, prompt))
        self.reusable[rid] = {f"p{i}": min(n, len(prompt)) for i, n in enumerate(reusable)}
        self.round()

    def finish(self, key: str) -> None:
        if self.busy_since[key] is not None:
            self.busy_since[key] = None
            self.idle_since[key] = self.clock.now
            self.round()

    def advance(self, dt: float) -> None:
        """Time passes; the pool asks again at each recheck on the way (a hair after it, as its timer
        does: ``RECHECK_SLACK_S``), and nowhere else."""
        end = self.clock.now + dt
        while self.rechecks and min(self.rechecks) <= end:
            self.clock.now = max(self.clock.now, min(self.rechecks) + 1e-6)
            self.rechecks.clear()  # the pool's one timer fired: its round asks everyone again
            self.round()
        self.clock.now = max(self.clock.now, end)
        self.audit()


def mini_pool() -> MiniPool:
    clock = Clock(100.0)
    return MiniPool(PrefixAware(BOUND_S, clock=clock), clock)


events = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.lists(st.integers(0, 100), min_size=N_PHONES, max_size=N_PHONES)),
        st.tuples(st.just("finish"), st.integers(0, N_PHONES - 1)),
        st.tuples(st.just("advance"), st.floats(0.0, 3.0)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(events)
def test_no_request_starves_under_any_stream_of_requests_and_phone_events(stream: list[tuple[str, Any]]) -> None:
    """Whatever arrives and whenever phones finish: a request waits beside a free phone only by choice
    and within its bound, never while an older one that did not choose so waits (the checks are in
    ``MiniPool.round``), and once the phones keep finishing, every request gets a phone, oldest first
    among those past their deadline."""
    pool = mini_pool()
    for i, (kind, arg) in enumerate(stream):
        if kind == "arrive":
            pool.arrive(f"r{i}", arg)
        elif kind == "finish":
            pool.finish(f"p{arg}")
        else:
            pool.advance(arg)
    waiting = len(pool.queue)
    for _ in range(waiting // N_PHONES + 2):  # each turn every phone finishes, and the deadlines pass
        pool.advance(BOUND_S)
        for key in list(pool.busy_since):
            pool.finish(key)
    assert pool.queue == []
    assert len(pool.granted) == sum(1 for kind, _ in stream if kind == "arrive")


@st.composite
def held_prompt(draw: st.DrawFn) -> tuple[list[int], int]:
    """A prompt's length (1 to 300 tokens) and what each phone holds of it (often nothing)."""
    length = draw(st.integers(1, 300))
    return draw(st.lists(st.just(0) | st.integers(0, length), min_size=N_PHONES, max_size=N_PHONES)), length


loaded = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), held_prompt()),
        st.tuples(st.just("finish"), st.integers(0, N_PHONES - 1)),
        st.tuples(st.just("advance"), st.floats(0.0, 3.0)),
        st.tuples(st.just("leave"), st.integers(0, 20)),
    ),
    max_size=80,
)


# every phone busy; b holds 40 of its 100 tokens on p0 (alone, 2.85 s there against 3.08 s on a free
# phone: equals), c as much on p1; p3 frees: each, with the other waiting (3.39 s for a free phone),
# rather waits; then c leaves, or c gets p1: b, alone, would take p3
BOTH_WAIT = [*[("arrive", ([0] * N_PHONES, 100))] * N_PHONES, ("arrive", ([40, 0, 0, 0], 100)),
             ("arrive", ([0, 40, 0, 0], 100)), ("finish", 3)]


@settings(max_examples=300, deadline=None)
@given(loaded)
@example([*BOTH_WAIT, ("leave", 1)])
@example([*BOTH_WAIT, ("finish", 1)])
def test_under_load_no_request_waits_beside_a_free_phone_the_router_would_now_give_it(
        stream: list[tuple[str, Any]]) -> None:
    """What a request weighs depends on the queue (``others_waiting``): a grant in the same round or a
    waiter leaving can turn a deliberate wait into a choice of a free phone. Prompts of 1 to 300
    tokens, phones holding any part of them, waiters leaving: after every change nobody waits beside
    a free phone the router would give it now (``MiniPool.audit``), and everyone left is served.
    (Routing once per change, as the pool did, fails this.)"""
    pool = mini_pool()
    arrived = left = 0
    for i, (kind, arg) in enumerate(stream):
        if kind == "arrive":
            reusable, length = arg
            pool.arrive(f"r{i}", reusable, list(range(length)))
            arrived += 1
        elif kind == "finish":
            pool.finish(f"p{arg}")
        elif kind == "advance":
            pool.advance(arg)
        elif pool.queue:
            pool.leave(arg)
            left += 1
    for _ in range(len(pool.queue) // N_PHONES + 2):
        pool.advance(BOUND_S)
        for key in list(pool.busy_since):
            pool.finish(key)
    assert pool.queue == [] and len(pool.granted) == arrived - left


def test_a_request_waiting_for_its_phone_is_passed_by_later_ones_only_for_phones_it_declined() -> None:
    pool = mini_pool()
    for key in ("p0", "p1", "p2"):
        pool.busy_since[key] = pool.clock.now  # busy one more second each; p3 free
    pool.arrive("holds-p0", [95, 0, 0, 0])  # waits for p0 (1.15 s) rather than take p3 (3.08 s)
    assert pool.queue and pool.order == []
    pool.arrive("new", [0, 0, 0, 0])  # nothing to reuse: takes p3 meanwhile
    assert pool.granted == {"new": "p3"}
    pool.finish("p1")  # not the phone it waits for: still worth waiting for p0
    pool.arrive("holds-p0-too", [95, 0, 0, 0])  # behind it for p0: 2.15 s, waits too
    assert [r.request_id for r in pool.queue] == ["holds-p0", "holds-p0-too"]
    pool.finish("p0")  # the older one gets it
    assert pool.granted["holds-p0"] == "p0"
    pool.advance(BOUND_S)  # the younger one gives up on p0 at its deadline: takes p1
    assert pool.granted["holds-p0-too"] == "p1"


def test_many_conversations_at_once_spread_over_the_phones_instead_of_queueing_for_one() -> None:
    """Eight conversations share a system prompt that only p0 holds (60 of 100 tokens): the first
    takes p0, the second waits for it (1 s + 40 tokens beats 100 tokens), but for the third p0 is two
    requests away, so it and the next take the other phones: four run at once, one waits for p0."""
    pool = mini_pool()
    for i in range(8):
        pool.arrive(f"c{i}", [60, 0, 0, 0])
    assert pool.granted == {"c0": "p0", "c2": "p1", "c3": "p2", "c4": "p3"}
    assert [r.request_id for r in pool.queue] == ["c1", "c5", "c6", "c7"]
    pool.finish("p0")
    assert pool.granted["c1"] == "p0"


def test_conversations_each_go_back_to_the_phone_holding_them() -> None:
    pool = mini_pool()
    for i in range(N_PHONES):
        pool.arrive(f"turn1-c{i}", [0] * N_PHONES)  # idle longest first: c0 p0, c1 p1, ...
    for key in list(pool.busy_since):
        pool.finish(key)
    pool.advance(1.0)
    for i in reversed(range(N_PHONES)):  # their second turns, in another order
        held = [90 if j == int(pool.granted[f"turn1-c{i}"][1:]) else 0 for j in range(N_PHONES)]
        pool.arrive(f"turn2-c{i}", held)
    assert all(pool.granted[f"turn2-c{i}"] == pool.granted[f"turn1-c{i}"] for i in range(N_PHONES))


# --------------------------------------------------------------------------- the pool asks the router


class Recorder:
    """Names the free phone listed last that the request does not avoid (unlike IdleLongest's choice
    among equals), or none when told to decline; records what it was shown."""

    def __init__(self, decline: bool = False) -> None:
        self.decline = decline
        self.seen: list[tuple[RouteRequest, list[PhoneView]]] = []

    def choose(self, request: RouteRequest, phones: Sequence[PhoneView]) -> str | None:
        self.seen.append((request, list(phones)))
        free = [p.key for p in phones if p.free and p.key not in request.avoid]
        return None if self.decline or not free else free[-1]


async def test_the_pool_grants_the_phone_its_router_names() -> None:
    router = Recorder()
    pool, phones = make_pool(3, router=router)
    await run(pool, "r0")
    assert phones["p2"].served == ["r0"] and not phones["p0"].served
    request, views = router.seen[0]
    assert (request.request_id, request.model, request.avoid, list(request.prompt_ids)) == ("r0", "m", frozenset(),
                                                                                            [1, 2, 3])
    assert [(v.key, v.state, v.leased) for v in views] == [(k, PhoneState.READY, False) for k in phones]


async def test_the_router_sees_busy_phones_and_a_request_waits_while_its_router_declines() -> None:
    pool, phones = make_pool(2, router=Recorder(decline=True), queue_timeout_s=0.05)
    phones["p1"].set_state(PhoneState.BUSY)
    with pytest.raises(NoPhoneAvailable) as err:
        await run(pool, "r0")
    assert err.value.code == "queue_timeout" and not phones["p0"].served
    router = pool._router
    assert isinstance(router, Recorder)
    assert {(v.key, v.state) for v in router.seen[-1][1]} == {("p0", PhoneState.READY), ("p1", PhoneState.BUSY)}
    assert pool.audit() == []  # not stuck: the router chose to wait


async def test_a_retry_tells_the_router_which_phone_failed_it() -> None:
    router = Recorder()
    pool, phones = make_pool(2, router=router)
    phones["p1"].fail_before = 1
    await run(pool, "r0")
    assert phones["p1"].served == ["r0"] and phones["p0"].served == ["r0"]
    assert router.seen[-1][0].avoid == frozenset({"p1"})
