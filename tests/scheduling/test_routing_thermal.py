"""Thermal-aware routing (server/scheduling/routing.py ``ThermalAware``) around both policies: drained
phones are hidden, the coolest free phones shown; then the seam: a pool with ``thermal_routing on``
over in-process phones whose health a test sets (a drained phone gets nothing until its phone says it
recovered, and the waiting request goes to it then). On simulated phones: test_thermal_e2e.py."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.backends.base import PhoneCondition, PhoneState
from server.scheduling.pool import default_router
from server.scheduling.routing import (
    IdleLongest,
    PhoneView,
    PrefixAware,
    Router,
    RouteRequest,
    ThermalAware,
    WaitFor,
)
from server.settings import Settings
from tests.scheduling.pool_doubles import make_pool, run

READY, BUSY = PhoneState.READY, PhoneState.BUSY
INNER = pytest.mark.parametrize("inner", [IdleLongest(), PrefixAware(5.0, clock=lambda: 0.0)],
                                ids=["idle-longest", "prefix-aware"])


def request(rid: str = "r", avoid: Sequence[str] = (), prompt: Sequence[int] = (1, 2, 3)) -> RouteRequest:
    return RouteRequest(rid, "m", frozenset(avoid), enqueued=0.0, prompt_ids=list(prompt))


def view(key: str, state: PhoneState = READY, *, idle_since: float = 0.0, status: int | None = None,
         temp: float | None = None, drained: str | None = None, leased: bool = False, reusable: int = 0,
         wait_s: float | None = 0.0) -> PhoneView:
    return PhoneView(key, state, leased, idle_since, reusable, wait_s, None, status, temp, drained)


@INNER
def test_a_drained_phone_is_never_chosen_even_idle_longest(inner: Router) -> None:
    router = ThermalAware(inner)
    phones = [view("hot", idle_since=0.0, status=3, temp=45.0, drained="thermal"), view("ok", idle_since=5.0)]
    assert router.choose(request(), phones) == "ok"
    assert router.choose(request(), phones[:1]) is None  # it waits rather than go to a drained phone
    low = [view("low", drained="battery"), view("busy", BUSY, leased=True)]
    assert router.choose(request(), low) is None


@INNER
def test_of_idle_phones_the_cooler_wins_over_the_idle_longest(inner: Router) -> None:
    router = ThermalAware(inner, margin_c=2.0)
    warm = view("warm", idle_since=0.0, status=0, temp=37.0)
    cool = view("cool", idle_since=9.0, status=0, temp=30.0)
    assert router.choose(request(), [warm, cool]) == "cool"
    moderate = view("moderate", idle_since=0.0, status=2, temp=35.0)  # status first, then degrees
    light = view("light", idle_since=9.0, status=1, temp=39.0)
    assert router.choose(request(), [moderate, light]) == "light"


@INNER
def test_phones_within_the_margin_or_without_a_reading_are_equals(inner: Router) -> None:
    router = ThermalAware(inner, margin_c=2.0)
    phones = [view("a", idle_since=3.0, temp=31.5), view("b", idle_since=1.0, temp=30.0),
              view("unknown", idle_since=2.0)]
    assert router.choose(request(), phones) == "b"  # idle longest of the equals
    phones[1] = view("b", idle_since=9.0, temp=30.0)
    assert router.choose(request(), phones) == "unknown"  # no reading is never held against a phone


def test_a_warmer_phone_holding_the_prompt_is_not_passed_over_for_a_cooler_one_holding_less() -> None:
    router = ThermalAware(PrefixAware(5.0, clock=lambda: 0.0), margin_c=2.0)
    prompt = list(range(100))
    holder = view("holder", idle_since=0.0, status=1, temp=39.0, reusable=90)
    cool = view("cool", idle_since=9.0, status=0, temp=26.0)
    assert router.choose(request(prompt=prompt), [holder, cool]) == "holder"  # 10 tokens there, 100 here
    other = [1000 + i for i in range(100)]  # a prompt nobody holds: the cooler one
    assert router.choose(request(prompt=other), [dataclasses.replace(holder, reusable=0), cool]) == "cool"


def test_a_busy_phone_holding_the_prompt_may_still_be_waited_for_unless_drained() -> None:
    inner = PrefixAware(5.0, clock=lambda: 0.0)
    router = ThermalAware(inner)
    prompt = list(range(100))
    busy = view("holder", BUSY, leased=True, reusable=95, wait_s=0.5, status=2, temp=42.0)
    free = view("free", temp=30.0)
    assert isinstance(router.choose(request(prompt=prompt), [busy, free]), WaitFor)
    drained = dataclasses.replace(busy, drained="thermal", thermal_status=3)
    assert router.choose(request(prompt=prompt), [drained, free]) == "free"


def test_a_retry_avoids_the_phone_it_failed_on_before_weighing_temperatures() -> None:
    router = ThermalAware(IdleLongest())
    phones = [view("failed", temp=25.0), view("warm", temp=36.0)]
    assert router.choose(request(avoid=["failed"]), phones) == "warm"
    # its only other phone is drained: back to the one it failed on rather than to a hot one
    hot = [view("failed", temp=25.0), view("hot", status=4, temp=48.0, drained="thermal")]
    assert router.choose(request(avoid=["failed"]), hot) == "failed"


views = st.builds(
    view, key=st.sampled_from("abcdef"), state=st.sampled_from([READY, BUSY]), idle_since=st.floats(0, 10),
    status=st.none() | st.integers(0, 6), temp=st.none() | st.floats(20, 60),
    drained=st.sampled_from([None, None, "thermal", "battery"]), leased=st.booleans())


@given(phones=st.lists(views, max_size=6, unique_by=lambda v: v.key), avoid=st.sets(st.sampled_from("abcdef")))
def test_thermal_aware_only_ever_names_a_free_undrained_phone_the_inner_policy_would_name(
        phones: list[PhoneView], avoid: set[str]) -> None:
    req = request(avoid=sorted(avoid))
    choice = ThermalAware(IdleLongest(), margin_c=2.0).choose(req, phones)
    serving = [p for p in phones if p.drained is None]
    if choice is None:
        # nothing it may use among the phones that serve: exactly when the inner policy finds none there
        assert IdleLongest().choose(req, serving) is None
        return
    chosen = next(p for p in phones if p.key == choice)
    assert chosen.free and chosen.drained is None
    usable = [p for p in serving if p.free and (p.key not in avoid or all(q.key in avoid for q in serving))]
    assert chosen in usable
    # no usable phone is cooler and would reuse as much
    router = ThermalAware(IdleLongest(), margin_c=2.0)
    assert not any(router.cooler(p, chosen) and p.reusable >= chosen.reusable for p in usable)


def test_thermal_routing_on_wraps_the_policy_state_reuse_picks_and_off_leaves_it_alone() -> None:
    on = default_router(Settings(sim=0))
    assert isinstance(on, ThermalAware) and isinstance(on.inner, PrefixAware) and on.margin_c == 2.0
    reuse_off = default_router(Settings(sim=0, state_reuse="off", thermal_prefer_margin_c=5))
    assert isinstance(reuse_off, ThermalAware) and isinstance(reuse_off.inner, IdleLongest)
    assert reuse_off.margin_c == 5
    assert isinstance(default_router(Settings(sim=0, thermal_routing="off")), PrefixAware)


async def until(predicate: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def test_a_request_waits_while_every_phone_is_drained_and_runs_once_one_recovers() -> None:
    pool, phones = make_pool(2, thermal_routing="on")
    for p in phones.values():
        p.condition = PhoneCondition(3, 45.0, "thermal")
    waiting = asyncio.ensure_future(run(pool, "r"))
    await until(lambda: pool.queue_depth() == 1)
    await asyncio.sleep(0.01)
    assert not waiting.done() and pool.audit() == []  # no free phone it may use: waiting is right
    phones["p1"].condition = PhoneCondition(2, 40.9, None)
    pool.phone_changed(phones["p1"])  # what a phone does when its drain decision changes
    await asyncio.wait_for(waiting, 5)
    assert phones["p1"].served == ["r"] and phones["p0"].served == []


async def test_a_drained_phone_gets_nothing_while_requests_spread_over_the_others() -> None:
    pool, phones = make_pool(3, thermal_routing="on")
    phones["p0"].condition = PhoneCondition(4, 48.0, "thermal")
    await asyncio.gather(*(run(pool, f"r{i}") for i in range(12)))
    assert phones["p0"].served == []
    assert len(phones["p1"].served) + len(phones["p2"].served) == 12 and pool.audit() == []


async def test_phones_draining_and_recovering_under_a_burst_lose_no_request_and_keep_the_books_straight() -> None:
    pool, phones = make_pool(3, thermal_routing="on")
    for p in phones.values():
        p.steps = 3  # each request takes a few event-loop turns: grants, claims and flips interleave
    rng = random.Random(7)
    stop = asyncio.Event()

    async def churn() -> None:
        while not stop.is_set():
            p = phones[rng.choice(sorted(phones))]
            p.condition = PhoneCondition(3, 45.0, "thermal") if rng.random() < 0.5 else PhoneCondition(0, 30.0)
            pool.phone_changed(p)
            assert pool.audit() == []  # holds at every task switch (see PhonePool.audit)
            await asyncio.sleep(0)

    flipper = asyncio.ensure_future(churn())
    results = await asyncio.gather(*(run(pool, f"b{i}") for i in range(60)), return_exceptions=True)
    stop.set()
    await flipper
    for p in phones.values():  # all back in service: nothing may be left waiting
        p.condition = PhoneCondition(0, 30.0)
        pool.phone_changed(p)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert sum(len(p.served) for p in phones.values()) == 60
    assert pool.queue_depth() == 0 and pool.running() == 0 and pool.audit() == []
