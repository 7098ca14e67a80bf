"""What the pool announces to its watchers (the console's event stream is built on it): every phone
change and every move of a queue; and how long the oldest waiter has waited."""

from __future__ import annotations

import asyncio

from server.backends.base import PhoneState
from tests.scheduling.pool_doubles import make_pool, run


async def test_watchers_hear_of_phone_changes_and_queue_moves_until_they_stop() -> None:
    pool, phones = make_pool(1)
    heard: list[int] = []

    def listener() -> None:
        heard.append(pool.queue_depth())

    stop = pool.watch(listener)
    phones["p0"].set_state(PhoneState.QUARANTINED)
    assert heard == [0]  # a phone's change
    phones["p0"].set_state(PhoneState.READY)
    phones["p0"].hold = True
    first = asyncio.ensure_future(run(pool, "r1"))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(run(pool, "r2"))  # queued: the only phone is busy
    for _ in range(5):
        await asyncio.sleep(0)
    assert pool.queue_depth() == 1 and heard[-1] == 1  # the queue's move was announced
    n = len(heard)
    phones["p0"].release()
    await first
    phones["p0"].release()
    await second
    assert len(heard) > n and heard[-1] == 0  # r2 granted the phone, both handed it back
    stop()
    stop()  # twice is harmless
    n = len(heard)
    phones["p0"].set_state(PhoneState.OFFLINE)
    assert len(heard) == n


async def test_a_failing_watcher_does_not_break_the_pool() -> None:
    pool, _ = make_pool(1)

    def broken() -> None:
        raise RuntimeError("watcher bug")

    pool.watch(broken)
    events = await run(pool, "r1")
    assert events[-1].reason == "length"  # type: ignore[union-attr]
    assert pool.audit() == []


async def test_queue_wait_is_the_oldest_waiters() -> None:
    pool, phones = make_pool(1)
    assert pool.queue_wait_s("m") == 0.0 and pool.queue_wait_s("unknown") == 0.0
    phones["p0"].hold = True
    first = asyncio.ensure_future(run(pool, "r1"))
    await asyncio.sleep(0)
    waiting = asyncio.ensure_future(run(pool, "r2"))
    await asyncio.sleep(0.05)
    later = asyncio.ensure_future(run(pool, "r3"))
    await asyncio.sleep(0)
    assert pool.queue_depth("m") == 2
    assert pool.queue_wait_s("m") >= 0.05  # r2's, not r3's
    for task in (first, waiting, later):
        phones["p0"].release()
        await task
    assert pool.queue_wait_s("m") == 0.0
