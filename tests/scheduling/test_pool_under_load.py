"""The pool (server/scheduling/pool.py) with the prefix-aware router under load: what a request weighs
depends on the queue (``RouteRequest.others_waiting``), so whenever the queue changes, a grant in the
same routing round or a waiter leaving, the pool routes again; no request waits beside a free phone
that the router, asked now, would give it (``PhonePool.audit``); and a deliberate wait never ends in a
queue timeout, however long the request queued before it began. In-process phones that say what they
hold (tests/scheduling/pool_doubles.py); the policy alone and the routing round in virtual time:
test_routing.py."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from server.backends.base import PhoneState
from server.scheduling.pool import PhonePool
from server.scheduling.routing import PrefixAware
from tests.scheduling.pool_doubles import DoublePhone, make_pool, run

# 300 prompt tokens at 300 ms each: 90 s on an empty phone, 9 s on the phone holding 270. A request's
# phone time is taken as 90 s, so a busy phone holding 270 is 99 s away, less as its request runs on
# (81 s after 18 s: then a wait would be worth it even alone; the test takes a second or two). Alone in
# the queue a request takes a free phone (90 s); with one other waiting on three phones, the free phone
# also costs that other a third of the 81 s it would spend beyond the busy phone (117 s in all), and
# the request rather waits for the busy one
B = list(range(300))
C = [5000 + i for i in range(300)]
MS = 300.0
SERVICE_S = 90.0


async def until(predicate: object, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def loaded_pool() -> tuple[PhonePool, dict[str, DoublePhone], list[str]]:
    """Three phones at 300 ms a prompt token, p0 holding B, p1 holding C; and what the audit found
    wrong after every move of the pool (a phone's change, a routing round), however short-lived."""
    pool, phones = make_pool(3, route_wait_max_s=120.0, queue_timeout_s=300.0)
    problems: list[str] = []
    pool.watch(lambda: problems.extend(pool.audit()))
    assert isinstance(pool._router, PrefixAware)
    pool._service_s["m"] = SERVICE_S
    phones["p0"].holds, phones["p1"].holds = [B[:270]], [C[:270]]
    for p in phones.values():
        p.hold, p.prefill_ms_per_token = True, MS
    return pool, phones, problems


async def two_waiting_beside_a_free_phone(
        pool: PhonePool, phones: dict[str, DoublePhone]) -> tuple[list[asyncio.Future[object]], ...]:
    """p0 and p1 busy with the conversations they hold, p2 busy outside any request (winding down); b
    (held on p0) and c (held on p1) queue; p2 is ready again: each, with the other waiting, rather
    waits for its own phone."""
    phones["p2"].set_state(PhoneState.BUSY)
    held = [asyncio.ensure_future(run(pool, "h0", prompt_ids=B)), asyncio.ensure_future(run(pool, "h1", prompt_ids=C))]
    await until(lambda: pool.running() == 2)
    assert [p.served for p in phones.values()] == [["h0"], ["h1"], []]
    b = asyncio.ensure_future(run(pool, "b", prompt_ids=B))
    c = asyncio.ensure_future(run(pool, "c", prompt_ids=C))
    await until(lambda: pool.queue_depth("m") == 2)
    phones["p2"].set_state(PhoneState.READY)
    assert pool.queue_depth("m") == 2 and phones["p2"].served == []  # both wait, by choice
    assert pool.audit() == []
    return held, [b, c]


async def finish(phones: dict[str, DoublePhone], tasks: list[asyncio.Future[object]]) -> None:
    for p in phones.values():
        p.hold = False
        p.release()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)


async def test_a_waiter_leaving_routes_the_queue_again() -> None:
    """c's client goes away: b, alone now, would take the free phone p2 rather than wait 9.4 s for p0.
    Before, nothing routed again: b waited beside p2 until its deadline (30 s), and the audit said so."""
    pool, phones, problems = loaded_pool()
    held, (b, c) = await two_waiting_beside_a_free_phone(pool, phones)
    c.cancel()
    await until(lambda: c.done())
    assert pool.audit() == []
    await until(lambda: phones["p2"].served == ["b"])
    await finish(phones, [*held, b, c])
    assert pool.audit() == [] and pool.leased() == 0 and problems == []


async def test_a_grant_in_a_routing_round_routes_the_rest_of_the_queue_again() -> None:
    """p1 frees: c gets it (its own phone) in the same round in which b, weighing c's wait, chose to
    wait for p0. Alone now, b would take p2: the pool routes again until nothing changes (before: b
    waited beside p2 until its deadline)."""
    pool, phones, problems = loaded_pool()
    held, (b, c) = await two_waiting_beside_a_free_phone(pool, phones)
    held[1].cancel()  # h1's client leaves (no request time to average in), c takes p1 and holds it
    await until(lambda: phones["p1"].served == ["h1", "c"])
    assert pool.audit() == []
    await until(lambda: phones["p2"].served == ["b"])
    await finish(phones, [*held, b, c])
    assert pool.audit() == [] and pool.leased() == 0 and problems == []


async def test_a_wait_for_a_busy_phone_never_ends_in_a_queue_timeout() -> None:
    """A request queues while every phone is busy, for longer than half its queue timeout; then a phone
    frees that holds nothing of its prompt, while the busy p0 holds most of it. A deliberate wait is
    bounded from when it begins (``route_wait_max_s``), but must also end by half the queue timeout
    from joining the queue, as ``route_wait_max_s`` <= half of ``queue_timeout_s`` promises: r takes
    the free phone. Before, it waited for p0 past its queue timeout and got a 503 beside a free phone."""
    pool, phones = make_pool(2, route_wait_max_s=1.0, queue_timeout_s=2.0)
    pool._service_s["m"] = 0.2  # p0 is expected to free any moment: waiting for it looks worth it
    p0, p1 = phones["p0"], phones["p1"]
    p0.holds, p0.hold = [list(range(90))], True
    p1.set_state(PhoneState.BUSY)  # busy outside any request (winding down a cancel)
    held = asyncio.ensure_future(run(pool, "h", prompt_ids=list(range(100))))
    await until(lambda: pool.running() == 1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = asyncio.ensure_future(run(pool, "r", prompt_ids=list(range(100))))
    await until(lambda: pool.queue_depth("m") == 1)
    await asyncio.sleep(1.3)  # past half its queue timeout
    if r.done() or loop.time() - t0 > 1.8:
        pytest.skip("the event loop stalled for most of the queue timeout: nothing left to see")
    p1.set_state(PhoneState.READY)
    await asyncio.wait_for(r, 5.0)  # before: NoPhoneAvailable (queue_timeout), p1 free all along
    assert p1.served == ["r"] and pool.audit() == []
    p0.hold = False
    p0.release()
    await asyncio.wait_for(held, 5.0)
    assert pool.audit() == [] and pool.leased() == 0


async def test_a_wait_for_an_overrunning_phone_ends_when_the_phone_can_no_longer_come_in_time() -> None:
    """p0 holds r's prompt and runs a request that overruns the average (0.4 s). r waits for it (0.7 s
    against 3.1 s on the free p1), bounded at 0.6 s. Once p0's request has run past the average, its
    expected end (at least half an average more) moves later with the clock and passes r's deadline
    0.2 s before it: from then on the router, asked, gives r the free phone. The pool asks again
    then; before, it asked at the deadline only, and in between r waited beside p1 against its
    router's choice (the audit, polled all along, said so)."""
    pool, phones = make_pool(2, route_wait_max_s=0.6, queue_timeout_s=10.0)
    pool._service_s["m"] = 0.4
    p0, p1 = phones["p0"], phones["p1"]
    p0.holds, p0.hold = [list(range(90))], True
    held = asyncio.ensure_future(run(pool, "h", prompt_ids=list(range(100))))
    await until(lambda: pool.running() == 1)
    r = asyncio.ensure_future(run(pool, "r", prompt_ids=list(range(100))))
    await until(lambda: pool.queue_depth("m") == 1)
    problems: list[str] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5.0
    while not p1.served and loop.time() < deadline:  # the audit at every turn until r has a phone
        problems += pool.audit()
        await asyncio.sleep(0.001)
    assert p1.served == ["r"] and problems == []
    await asyncio.wait_for(r, 5.0)
    p0.hold = False
    p0.release()
    await asyncio.wait_for(held, 5.0)
    assert pool.audit() == [] and pool.leased() == 0
