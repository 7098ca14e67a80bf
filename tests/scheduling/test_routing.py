"""Routing (server/scheduling/routing.py): policies alone (a request and phone views in, a key out; no
pool, no queue), then the seam: the pool asks the router it was given and grants what it names."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.backends.base import PhoneState
from server.errors import NoPhoneAvailable
from server.scheduling.routing import IdleLongest, PhoneView, Router, RouteRequest
from tests.scheduling.pool_doubles import make_pool, run

READY, BUSY = PhoneState.READY, PhoneState.BUSY


def request(rid: str = "r", avoid: Sequence[str] = ()) -> RouteRequest:
    return RouteRequest(rid, "m", frozenset(avoid), enqueued=0.0, prompt_ids=[1, 2, 3])


def view(key: str, state: PhoneState = READY, *, leased: bool = False, idle_since: float = 0.0) -> PhoneView:
    return PhoneView(key, state, leased, idle_since)


def test_the_phone_idle_longest_is_chosen() -> None:
    phones = [view("a", idle_since=3.0), view("b", idle_since=1.0), view("c", idle_since=2.0)]
    assert IdleLongest().choose(request(), phones) == "b"


def test_a_phone_never_handed_back_counts_as_idle_longest_and_ties_keep_the_pool_order() -> None:
    phones = [view("a", idle_since=5.0), view("b"), view("c")]
    assert IdleLongest().choose(request(), phones) == "b"


def test_busy_and_leased_phones_are_never_chosen() -> None:
    phones = [view("busy", BUSY), view("granted", leased=True), view("free", idle_since=9.0)]
    assert IdleLongest().choose(request(), phones) == "free"
    assert IdleLongest().choose(request(), phones[:2]) is None


def test_a_phone_that_failed_the_request_is_avoided_while_another_serves_the_model() -> None:
    phones = [view("failed"), view("other", idle_since=9.0)]
    assert IdleLongest().choose(request(avoid=["failed"]), phones) == "other"


def test_the_request_waits_for_a_busy_phone_rather_than_go_back_to_the_one_that_failed_it() -> None:
    phones = [view("failed"), view("other", BUSY)]
    assert IdleLongest().choose(request(avoid=["failed"]), phones) is None


def test_when_every_phone_serving_the_model_failed_the_request_any_free_one_will_do() -> None:
    assert IdleLongest().choose(request(avoid=["only"]), [view("only")]) == "only"
    phones = [view("a", idle_since=2.0), view("b", idle_since=1.0)]
    assert IdleLongest().choose(request(avoid=["a", "b"]), phones) == "b"


def test_no_phones_no_choice() -> None:
    assert IdleLongest().choose(request(), []) is None


def test_idle_longest_is_a_router() -> None:
    router: Router = IdleLongest()
    assert router.choose(request(), [view("a")]) == "a"


# --------------------------------------------------------------------------- properties

keys = st.sampled_from(["p0", "p1", "p2", "p3", "p4"])
views = st.lists(
    st.builds(view, keys, st.sampled_from([READY, BUSY]), leased=st.booleans(),
              idle_since=st.sampled_from([0.0, 1.0, 2.0, 3.0])),
    max_size=5, unique_by=lambda v: v.key,
)
avoids = st.lists(st.frozensets(keys, max_size=3), min_size=1, max_size=5)


@given(views, avoids)
def test_the_choice_is_the_free_phone_idle_longest_among_those_the_request_may_use(
    phones: list[PhoneView], avoid_sets: list[frozenset[str]]
) -> None:
    for avoid in avoid_sets:
        every_one_failed_it = all(p.key in avoid for p in phones)
        usable = [p for p in phones if p.free and (p.key not in avoid or every_one_failed_it)]
        chosen = IdleLongest().choose(request(avoid=avoid), phones)
        if not usable:
            assert chosen is None
        else:
            assert chosen == next(p.key for p in usable if p.idle_since == min(u.idle_since for u in usable))


def offer_oldest_first(phones: list[PhoneView], waiters: list[frozenset[str]]) -> dict[int, str]:
    """How the pool uses a router: each waiter in FIFO order is offered what is still free."""
    granted: dict[int, str] = {}
    for i, avoid in enumerate(waiters):
        key = IdleLongest().choose(request(f"r{i}", avoid), phones)
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


@given(views, avoids)
def test_offering_phones_oldest_waiter_first_gives_each_free_phone_to_the_oldest_waiter_that_may_use_it(
    phones: list[PhoneView], waiters: list[frozenset[str]]
) -> None:
    assert offer_oldest_first(phones, waiters) == each_phone_to_the_oldest_waiter(phones, waiters)


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
