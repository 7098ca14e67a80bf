"""The pool's leases (server/scheduling/pool.py): a phone granted to a request is given back on every
way out: the request's end, its error, its queue timeout, its cancellation, its client going away,
and above all a grant that races any of these. A lost lease wedges the phone for good: it looks
ready and idle in /v1/devices while every request waits for it and times out.

``PhonePool.audit()`` states the bookkeeping (leases held == requests running, plus grants not yet
claimed; no request waits while a phone it may use is idle, but by its router's bounded choice); the
storm asserts it at every step, with each routing policy."""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Sequence

import pytest

from server.backends.base import Finished, PhoneState
from server.errors import ModelNotFound, NoPhoneAvailable, Overloaded, PhoneLost
from server.scheduling.pool import PhonePool
from server.scheduling.routing import PhoneView, PrefixAware, Route, RouteRequest, WaitFor
from tests.scheduling.pool_doubles import DoublePhone, make_pool, params, run

STORM = 400  # requests per storm
TIMEOUTS = (0.0001, 0.0005, 0.001, 0.003, 0.01, 1.0)  # queue timeouts, mostly shorter than a request


async def until(predicate: object, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def every_phone_serves_at_once(pool: PhonePool, phones: dict[str, DoublePhone]) -> None:
    """One request per phone, held there together: no phone is lost to a stale lease."""
    for p in phones.values():
        p.hold, p.steps = True, 0
        p.served.clear()
    tasks = [asyncio.ensure_future(run(pool, f"after-{i}")) for i in range(len(phones))]
    await until(lambda: pool.running() == len(phones))
    assert all(len(p.served) == 1 for p in phones.values())
    for p in phones.values():
        p.hold = False
        p.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 2.0)


def assert_at_rest(pool: PhonePool) -> None:
    assert pool.audit() == []
    assert pool.leased() == pool.running() == pool.queue_depth() == 0


# --------------------------------------------------------------------------- the storm

PROMPTS = ([1] * 50 + [2] * 50, [3] * 50 + [4] * 50, [5] * 100)  # p0 holds most of the first, p1 half the second


class Counting:
    """A router that counts its answers by kind (a key, a WaitFor, None)."""

    def __init__(self, router: PrefixAware) -> None:
        self.router = router
        self.answers: collections.Counter[str] = collections.Counter()

    def choose(self, request: RouteRequest, phones: Sequence[PhoneView]) -> Route:
        choice = self.router.choose(request, phones)
        self.answers["wait" if isinstance(choice, WaitFor) else "none" if choice is None else "phone"] += 1
        return choice


def storm_pool(router: str, max_queue: int) -> tuple[PhonePool, dict[str, DoublePhone], Counting | None]:
    """Three phones. ``prefix-aware``: they hold parts of the storm's prompts, and a request waits for
    a busy phone holding its prompt 10 ms at most (a storm's request takes a few loop turns), so that
    deliberate waits begin, end at their phone and run out at their bound all through the storm."""
    if router == "idle-longest":
        pool, phones = make_pool(3, max_queue=max_queue, state_reuse="off")
        return pool, phones, None
    counting = Counting(PrefixAware(0.01))
    pool, phones = make_pool(3, max_queue=max_queue, router=counting)
    phones["p0"].holds = [PROMPTS[0][:90]]
    phones["p1"].holds = [PROMPTS[1][:50]]
    return pool, phones, counting


@pytest.mark.parametrize("router", ["idle-longest", "prefix-aware"])
@pytest.mark.parametrize(("seed", "max_queue"), [(1, 1000), (2, 1000), (3, 4)])
async def test_a_storm_of_timeouts_cancels_disconnects_and_unplugs_loses_no_phone(
    seed: int, max_queue: int, router: str
) -> None:
    rng = random.Random(seed)
    pool, phones, counting = storm_pool(router, max_queue)
    for p in phones.values():
        p.steps = 3  # a request takes a few loop turns: waiters pile up and time out
    outcomes: collections.Counter[str] = collections.Counter()

    async def request(i: int) -> None:
        # the pool reads the timeout as the request enters the queue (synchronously, below)
        pool._settings.queue_timeout_s = rng.choice(TIMEOUTS)
        disconnect = rng.random() < 0.15
        prompt = rng.choice(PROMPTS)
        try:
            if disconnect:  # the client goes away after the first event
                agen = pool.generate(params(f"r{i}", prompt_ids=prompt))
                async for _ in agen:  # type: ignore[attr-defined]
                    break
                await agen.aclose()  # type: ignore[attr-defined]
                outcomes["disconnected"] += 1
            else:
                await run(pool, f"r{i}", prompt_ids=prompt)
                outcomes["ok"] += 1
        except Overloaded:
            assert not pool._idle("m"), "queue full while a phone was free"
            outcomes["queue_full"] += 1
        except NoPhoneAvailable as e:
            outcomes[str(e.code)] += 1
        except PhoneLost:
            outcomes["phone_lost"] += 1
        except asyncio.CancelledError:
            outcomes["cancelled"] += 1
            raise

    async def cancel_after(task: asyncio.Task[None], turns: int) -> None:
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()  # queued, granted, running or done: whatever it was doing

    tasks: list[asyncio.Future[None]] = []
    for i in range(STORM):
        task = asyncio.ensure_future(request(i))
        tasks.append(task)
        if rng.random() < 0.3:
            tasks.append(asyncio.ensure_future(cancel_after(task, rng.randrange(8))))
        roll = rng.random()
        phone = rng.choice(list(phones.values()))
        if roll < 0.03:  # unplugged or plugged back in
            phone.set_state(PhoneState.OFFLINE if phone.state is not PhoneState.OFFLINE else PhoneState.READY)
        elif roll < 0.06:
            phone.fail_before += 1
        elif roll < 0.08:
            phone.fail_after_first += 1
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
            assert pool.audit() == []
        if rng.random() < 0.1:
            await asyncio.sleep(0.001)  # let the timers fire
            assert pool.audit() == []
    for p in phones.values():  # the fleet is whole again
        p.fail_before = p.fail_after_first = 0
        if p.state is PhoneState.OFFLINE:
            p.set_state(PhoneState.READY)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)
    assert not [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    # the storm did what it says: each way out was taken many times
    assert min(outcomes["ok"], outcomes["queue_timeout"], outcomes["cancelled"], outcomes["disconnected"]) > 10, outcomes
    if max_queue < 10:
        assert outcomes["queue_full"] > 10, outcomes
    if counting is not None:  # and the router chose to wait beside free phones many times
        assert counting.answers["wait"] > 10, counting.answers
    assert_at_rest(pool)
    await every_phone_serves_at_once(pool, phones)
    assert_at_rest(pool)


# --------------------------------------------------------------------------- each race, one at a time


@pytest.mark.parametrize("grant", ["just before the timeout", "just after the timeout"])
async def test_a_phone_granted_in_the_same_turn_as_the_queue_timeout_goes_back(grant: str) -> None:
    """The wedge of issue 10: the timeout ended the wait while the grant was on its way."""
    timeout = 0.2
    pool, phones = make_pool(2, queue_timeout_s=timeout)
    p0, p1 = phones["p0"], phones["p1"]
    p1.state = PhoneState.STARTING  # the phone the waiter will be granted, not serving yet
    p0.hold = True
    held = asyncio.ensure_future(run(pool, "h"))
    await until(lambda: pool.running() == 1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    waiter = asyncio.ensure_future(run(pool, "w"))
    await until(lambda: pool.queue_depth("m") == 1)
    t1 = loop.time()  # the waiter's deadline is between t0 + timeout and t1 + timeout
    when = t0 + timeout - 0.01 if grant.endswith("before the timeout") else t1 + timeout + 0.01
    loop.call_at(when, p1.set_state, PhoneState.READY)
    # the loop stands still (on purpose) until both fall due, so that one loop turn runs them both
    time.sleep(max(0.0, t1 + timeout + 0.05 - loop.time()))  # noqa: ASYNC251
    await asyncio.sleep(0)  # one loop turn runs the deadline and the grant, in `when` order
    try:
        await asyncio.wait_for(waiter, 1.0)  # got p1 after all, or timed out: both are fine ...
    except NoPhoneAvailable as e:
        assert e.code == "queue_timeout"
    assert pool.leased() == 1 and pool.audit() == []  # ... but only h holds a phone now
    events = await asyncio.wait_for(run(pool, "next"), 1.0)  # p1 serves at once (before: waits forever)
    assert p1.served[-1] == "next" and isinstance(events[-1], Finished)
    p0.hold = False
    p0.release()
    await held
    assert_at_rest(pool)


async def test_a_phone_granted_in_the_same_turn_as_its_waiter_is_cancelled_goes_back() -> None:
    pool, phones = make_pool(2)
    p0, p1 = phones["p0"], phones["p1"]
    p1.state = PhoneState.STARTING
    p0.hold = True
    held = asyncio.ensure_future(run(pool, "h"))
    await until(lambda: pool.running() == 1)
    waiter = asyncio.ensure_future(run(pool, "w"))
    await until(lambda: pool.queue_depth("m") == 1)
    p1.set_state(PhoneState.READY)  # granted to w ...
    waiter.cancel()  # ... which is cancelled before it wakes up (the client went away)
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert p1.served == [] and pool.leased() == 1 and pool.audit() == []
    await asyncio.wait_for(run(pool, "next"), 1.0)
    assert p1.served == ["next"]
    p0.hold = False
    p0.release()
    await held
    assert_at_rest(pool)


async def test_a_phone_granted_then_unplugged_before_its_request_starts_goes_back() -> None:
    pool, phones = make_pool(2)
    p0, p1 = phones["p0"], phones["p1"]
    p1.state = PhoneState.STARTING
    p0.hold = True
    held = asyncio.ensure_future(run(pool, "h"))
    await until(lambda: pool.running() == 1)
    waiter = asyncio.ensure_future(run(pool, "w"))
    await until(lambda: pool.queue_depth("m") == 1)
    p1.set_state(PhoneState.READY)  # granted to w ...
    p1.state = PhoneState.RESTARTING  # ... and gone before w runs on it (no event: the pool finds out)
    await until(lambda: pool.queue_depth("m") == 1)  # w is back in the queue, p1 not held
    assert pool.leased() == 1 and pool.audit() == []
    p1.set_state(PhoneState.READY)
    await asyncio.wait_for(waiter, 1.0)
    assert p1.served == ["w"]
    p0.hold = False
    p0.release()
    await held
    assert_at_rest(pool)


async def test_every_error_a_request_can_end_with_gives_its_phone_back() -> None:
    pool, phones = make_pool(1, max_queue=1, queue_timeout_s=0.05)
    p0 = phones["p0"]
    with pytest.raises(ModelNotFound):
        await run(pool, "x", model="never-served")
    p0.fail_after_first = 1
    with pytest.raises(PhoneLost):  # after the first token: reaches the caller
        await run(pool, "lost")
    p0.hold = True
    held = asyncio.ensure_future(run(pool, "h"))
    await until(lambda: pool.running() == 1)
    queued = asyncio.ensure_future(run(pool, "q"))
    await until(lambda: pool.queue_depth("m") == 1)
    with pytest.raises(Overloaded):
        await run(pool, "full")
    with pytest.raises(NoPhoneAvailable):
        await queued  # queue timeout
    p0.hold = False
    p0.release()
    await held
    assert_at_rest(pool)
    await every_phone_serves_at_once(pool, phones)


# --------------------------------------------------------------------------- the audit itself


async def test_the_audit_reports_a_lost_lease_and_a_waiter_left_beside_an_idle_phone() -> None:
    """The check the storm relies on can fail: it sees the two faces of a wedged pool."""
    pool, phones = make_pool(1)
    assert pool.audit() == []
    pool._leased["p0"] = "gone"  # a lease nobody will give back
    assert any("p0" in problem for problem in pool.audit())
    del pool._leased["p0"]
    phones["p0"].hold = True
    held = asyncio.ensure_future(run(pool, "h"))
    await until(lambda: pool.running() == 1)
    waiter = asyncio.ensure_future(run(pool, "w"))
    await until(lambda: pool.queue_depth("m") == 1)
    new = DoublePhone("p1", pool)
    phones["p1"] = new  # ready, but the pool was not told: w waits beside it
    assert any("idle" in problem for problem in pool.audit())
    pool.phone_changed(new)
    await asyncio.wait_for(waiter, 1.0)
    assert pool.audit() == []
    phones["p0"].hold = False
    phones["p0"].release()
    await held
    assert_at_rest(pool)


async def test_a_phone_is_never_given_back_by_a_request_that_does_not_hold_it() -> None:
    pool, phones = make_pool(1)
    phones["p0"].hold = True
    held = asyncio.ensure_future(run(pool, "h"))
    await until(lambda: pool.running() == 1)
    pool._release("p0", "someone-else")
    assert pool.leased() == 1 and pool.audit() == []
    phones["p0"].hold = False
    phones["p0"].release()
    await held
    assert_at_rest(pool)
