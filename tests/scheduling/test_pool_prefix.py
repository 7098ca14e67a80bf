"""The pool (server/scheduling/pool.py) with the prefix-aware router (server/scheduling/routing.py), its
policy with ``state_reuse on``, over in-process phones that say what they hold: a request waits for
the busy phone holding its prompt when that is faster, within ``route_wait_max_s`` and in FIFO order,
later requests take the free phones meanwhile, and many at once spread over the phones. The router
alone: test_routing.py; the lease storm with this router: test_pool_leases.py."""

from __future__ import annotations

import asyncio

import pytest

from server.errors import Overloaded
from server.scheduling.pool import PhonePool
from server.scheduling.routing import IdleLongest, PrefixAware
from tests.scheduling.pool_doubles import DoublePhone, make_pool, run

PROMPT = list(range(100))  # p0 holds 90 of it: 10 tokens to process there, 100 on an empty phone
OTHER = [7] * 100  # a prompt no phone holds


async def until(predicate: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def prefix_pool(n: int, *, service_s: float = 1.0, **settings: object) -> tuple[PhonePool, dict[str, DoublePhone]]:
    """``n`` phones, p0 holding 90 tokens of PROMPT; requests are taken to keep a phone ``service_s``
    (the pool's moving average, as if its earlier requests had taken that long) and a prompt token
    costs the default ~31 ms (100 tokens: 3.1 s; 10 tokens: 0.3 s)."""
    pool, phones = make_pool(n, **settings)
    assert isinstance(pool._router, PrefixAware)  # state_reuse on (the default)
    pool._service_s["m"] = service_s
    phones["p0"].holds = [PROMPT[:90]]
    return pool, phones


async def hold_on_p0(pool: PhonePool, phones: dict[str, DoublePhone]) -> asyncio.Future[object]:
    phones["p0"].hold = True
    held = asyncio.ensure_future(run(pool, "h", prompt_ids=PROMPT))  # p0: it holds the prompt
    await until(lambda: pool.running() == 1)
    assert phones["p0"].served == ["h"]
    return held


def test_state_reuse_picks_the_pool_policy() -> None:
    assert isinstance(make_pool(1)[0]._router, PrefixAware)
    assert isinstance(make_pool(1, state_reuse="off")[0]._router, IdleLongest)
    router = make_pool(1, route_wait_max_s=30.0, queue_timeout_s=20.0)[0]._router
    assert isinstance(router, PrefixAware) and router.wait_max_s == 10.0  # never waits into a 503


async def test_a_request_waits_for_the_busy_phone_holding_its_prompt_and_runs_there() -> None:
    pool, phones = prefix_pool(2)
    p0, p1 = phones["p0"], phones["p1"]
    held = await hold_on_p0(pool, phones)
    r = asyncio.ensure_future(run(pool, "r", prompt_ids=PROMPT))  # ~1.3 s on p0 against ~3.1 s on p1
    await until(lambda: pool.queue_depth("m") == 1)
    for _ in range(20):
        await asyncio.sleep(0)
    assert p1.served == [] and pool.queue_depth("m") == 1
    assert pool.audit() == []  # waiting beside a free phone, by the router's bounded choice
    p0.hold = False
    p0.release()
    await asyncio.wait_for(asyncio.gather(held, r), 2.0)
    assert p0.served == ["h", "r"] and p1.served == []


async def test_the_wait_for_a_busy_phone_ends_at_the_bound_without_any_phone_event() -> None:
    """p0 stays busy: by ``route_wait_max_s`` the request takes the free phone, though nothing
    changed meanwhile (before: it waited for p0 however long, beside a free phone). As p0 overruns the
    average request (0.1 s), it is expected half an average later at least: from half an average
    before the deadline on, it can no longer come in time, and the request takes p1 then."""
    bound = 0.2
    pool, phones = prefix_pool(2, service_s=0.1, route_wait_max_s=bound)
    p0, p1 = phones["p0"], phones["p1"]
    held = await hold_on_p0(pool, phones)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = asyncio.ensure_future(run(pool, "r", prompt_ids=PROMPT))
    await until(lambda: pool.queue_depth("m") == 1)
    assert p1.served == [] and pool.audit() == []
    await until(lambda: p1.served == ["r"])
    assert loop.time() - t0 >= bound - 0.05  # not before p0 could no longer come by the deadline
    await asyncio.wait_for(r, 2.0)
    assert p0.served == ["h"] and pool.audit() == []
    p0.hold = False
    p0.release()
    await held
    assert pool.audit() == [] and pool.leased() == pool.queue_depth() == 0


async def test_a_phone_busy_past_the_average_request_is_not_taken_to_be_free_at_once() -> None:
    """How long an overrunning request still runs is unknown, not 0: on fast phones (a prompt token
    costs 1 us, the whole prompt 0.1 ms) nothing is worth waiting for on a phone busy past the average
    (before: taken to be free any moment, so the request waited beside a free phone for a 0.09 ms gain)."""
    pool, phones = prefix_pool(2, service_s=0.05)
    for p in phones.values():
        p.prefill_ms_per_token = 0.001
    held = await hold_on_p0(pool, phones)
    await asyncio.sleep(0.1)  # h has held p0 longer than the average request
    r = asyncio.ensure_future(run(pool, "r", prompt_ids=PROMPT))
    await asyncio.sleep(0)  # r joins the queue: granted p1 at once (and run there), or waiting for p0
    assert pool.queue_depth("m") == 0 and phones["p1"].served == ["r"]
    await asyncio.wait_for(r, 2.0)
    phones["p0"].hold = False
    phones["p0"].release()
    await held


async def test_the_audit_reports_a_deliberate_wait_that_nothing_will_end() -> None:
    """The audit allows a wait beside a free phone only while the pool will ask again by its deadline."""
    pool, phones = prefix_pool(2)
    held = await hold_on_p0(pool, phones)
    r = asyncio.ensure_future(run(pool, "r", prompt_ids=PROMPT))
    await until(lambda: pool.queue_depth("m") == 1)
    assert pool.audit() == []
    assert pool._recheck is not None
    pool._recheck.cancel()  # the recheck lost: r would wait beside p1 until p0 frees, past its bound
    assert any("nothing asks again" in problem for problem in pool.audit())
    pool._recheck_due()
    assert pool.audit() == []
    phones["p0"].hold = False
    phones["p0"].release()
    await asyncio.wait_for(asyncio.gather(held, r), 2.0)


async def test_later_requests_take_free_phones_meanwhile_and_the_oldest_waiter_gets_the_phone_first() -> None:
    pool, phones = prefix_pool(3)
    p0, p1, p2 = phones["p0"], phones["p1"], phones["p2"]
    held = await hold_on_p0(pool, phones)
    r1 = asyncio.ensure_future(run(pool, "r1", prompt_ids=PROMPT))  # waits for p0
    await until(lambda: pool.queue_depth("m") == 1)
    p1.hold = True
    r2 = asyncio.ensure_future(run(pool, "r2", prompt_ids=OTHER))  # nothing to reuse: a free phone at once
    await until(lambda: p1.served == ["r2"])
    r3 = asyncio.ensure_future(run(pool, "r3", prompt_ids=PROMPT))  # p0 two requests away (~2.3 s): waits too
    await until(lambda: pool.queue_depth("m") == 2)
    assert p2.served == [] and pool.audit() == []
    p0.release()  # h ends: the older waiter gets p0 (and holds it)
    await until(lambda: p0.served == ["h", "r1"])
    assert pool.queue_depth("m") == 1 and p2.served == [] and pool.audit() == []
    p0.hold = False
    p0.release()  # r1 ends: r3 gets p0
    await asyncio.wait_for(asyncio.gather(held, r1, r3), 2.0)
    assert p0.served == ["h", "r1", "r3"] and p2.served == []
    p1.hold = False
    p1.release()
    await asyncio.wait_for(r2, 2.0)
    assert pool.audit() == [] and pool.leased() == 0


async def test_a_request_the_full_queue_cannot_hold_takes_a_free_phone_instead_of_a_429() -> None:
    pool, phones = prefix_pool(2, max_queue=1)
    p0, p1 = phones["p0"], phones["p1"]
    held = await hold_on_p0(pool, phones)
    r1 = asyncio.ensure_future(run(pool, "r1", prompt_ids=PROMPT))  # waits for p0: the queue is full
    await until(lambda: pool.queue_depth("m") == 1)
    p1.hold = True
    r2 = asyncio.ensure_future(run(pool, "r2", prompt_ids=PROMPT))  # would wait too: no room, so p1
    await until(lambda: p1.served == ["r2"])  # before: Overloaded, with p1 free
    with pytest.raises(Overloaded):  # every phone taken and the queue full: 429 as ever
        await run(pool, "r3", prompt_ids=PROMPT)
    for p in (p0, p1):
        p.hold = False
        p.release()
    await asyncio.wait_for(asyncio.gather(held, r1, r2), 2.0)
    assert p0.served == ["h", "r1"] and pool.audit() == [] and pool.leased() == 0


async def test_many_requests_at_once_spread_over_the_phones_instead_of_queueing_for_the_one_holding_them() -> None:
    """Eight requests share a prefix only p0 holds, worth 15 s of processing (50 tokens at 300 ms)
    against requests of 10 s: the first takes p0, the second waits for it, but for the third p0 is
    two requests (20 s) away, so it and the next take the other phones: four run at once."""
    pool, phones = prefix_pool(4, service_s=10.0, route_wait_max_s=60.0)
    for p in phones.values():
        p.hold, p.prefill_ms_per_token = True, 300.0
    phones["p0"].holds = [PROMPT[:50]]
    tasks = [asyncio.ensure_future(run(pool, f"c{i}", prompt_ids=PROMPT[:50] + [1000 + i] * 50)) for i in range(8)]
    await until(lambda: pool.running() == 4 and pool.queue_depth("m") == 4)
    assert [p.served for p in phones.values()] == [["c0"], ["c2"], ["c3"], ["c4"]]
    assert pool.audit() == []
    for p in phones.values():
        p.hold = False
        p.release()
    await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
    assert phones["p0"].served[:2] == ["c0", "c1"]  # the one that waited for p0 got it
    assert pool.audit() == [] and pool.leased() == 0
