"""The scheduler alone (server/scheduling/pool.py), with in-process phones: routing, FIFO order, the
queue's bounds, retries. The same behaviours through HTTP, adb and simulated phones are in
test_pool_e2e.py."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.backends.base import Finished, PhoneState, Started, Tokens
from server.errors import ModelNotFound, NoPhoneAvailable, Overloaded, PhoneLost
from tests.scheduling.pool_doubles import DoublePhone, make_pool, model_info, params, run


async def until(predicate: object, timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


async def test_concurrent_requests_each_get_their_own_idle_phone() -> None:
    pool, phones = make_pool(3)
    for p in phones.values():
        p.hold = True
    tasks = [asyncio.ensure_future(run(pool, f"r{i}")) for i in range(3)]
    await until(lambda: pool.running() == 3)
    assert sorted(len(p.served) for p in phones.values()) == [1, 1, 1]
    for p in phones.values():
        p.release()
    await asyncio.gather(*tasks)


async def test_sequential_requests_rotate_over_the_idle_phones() -> None:
    pool, phones = make_pool(3)
    for i in range(6):
        await run(pool, f"r{i}")
    assert [len(p.served) for p in phones.values()] == [2, 2, 2]  # the phone idle longest goes first


async def test_waiters_get_phones_in_arrival_order() -> None:
    pool, phones = make_pool(1)
    phone = phones["p0"]
    phone.hold = True
    first = asyncio.ensure_future(run(pool, "r0"))
    await until(lambda: pool.running() == 1)
    waiting = []
    for i in range(1, 6):
        waiting.append(asyncio.ensure_future(run(pool, f"r{i}")))
        await until(lambda n=i: pool.queue_depth("m") == n)
    for _ in range(6):
        phone.release()
        await asyncio.sleep(0.005)
    await asyncio.gather(first, *waiting)
    assert phone.served == [f"r{i}" for i in range(6)]


async def test_a_full_queue_is_overloaded_with_a_retry_estimate() -> None:
    pool, phones = make_pool(1, max_queue=2)
    phones["p0"].hold = True
    tasks = [asyncio.ensure_future(run(pool, f"r{i}")) for i in range(3)]  # one runs, two wait
    await until(lambda: pool.queue_depth("m") == 2)
    with pytest.raises(Overloaded) as e:
        await run(pool, "refused")
    assert e.value.retry_after >= 1.0 and e.value.status_code == 429
    assert pool.queue_depth("m") == 2  # the refused request took no place
    for _ in range(3):
        phones["p0"].release()
        await asyncio.sleep(0.005)
    await asyncio.gather(*tasks)


async def test_a_full_queue_never_refuses_a_request_an_idle_phone_can_take() -> None:
    """The queue is full of a request that may not use the idle phone (a retry avoiding the phone
    that failed it while another phone serves): a new request takes that idle phone, no 429."""
    pool, phones = make_pool(2, max_queue=1)
    p0, p1 = phones["p0"], phones["p1"]
    p0.hold = True
    held = asyncio.ensure_future(run(pool, "b"))  # p0 (idle longest) holds b
    await until(lambda: pool.running() == 1)
    p1.fail_before = 1
    retried = asyncio.ensure_future(run(pool, "r0"))  # fails on p1, then waits for p0
    await until(lambda: pool.queue_depth("m") == 1)
    assert p1.served == ["r0"] and p1.state is PhoneState.READY and pool.audit() == []
    events = await asyncio.wait_for(run(pool, "new"), 1.0)  # was: Overloaded, "queue full"
    assert p1.served == ["r0", "new"] and isinstance(events[-1], Finished)
    p0.hold = False
    p0.release()
    await asyncio.wait_for(asyncio.gather(held, retried), 1.0)
    assert p0.served == ["b", "r0"] and pool.audit() == [] and pool.leased() == 0


async def test_a_request_waits_no_longer_than_the_queue_limit() -> None:
    pool, phones = make_pool(1, queue_timeout_s=0.1)
    phones["p0"].hold = True
    running = asyncio.ensure_future(run(pool, "r0"))
    await until(lambda: pool.running() == 1)
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(NoPhoneAvailable) as e:
        await run(pool, "r1")
    assert 0.1 <= asyncio.get_running_loop().time() - t0 < 0.5
    assert e.value.code == "queue_timeout" and e.value.status_code == 503
    assert pool.queue_depth() == 0
    phones["p0"].release()
    await running


async def test_failure_before_the_first_token_is_retried_on_another_phone() -> None:
    pool, phones = make_pool(2)
    phones["p0"].fail_before = 1
    events = await run(pool, "r0")  # p0 is idle longest (never used): it gets the request first
    assert phones["p0"].served == ["r0"] and phones["p1"].served == ["r0"]
    assert [type(e) for e in events] == [Started, Started, Tokens, Finished]
    assert isinstance(events[-1], Finished) and events[1].phone == "p1"  # type: ignore[union-attr]


async def test_failure_after_the_first_token_reaches_the_caller() -> None:
    pool, phones = make_pool(2)
    phones["p0"].fail_after_first = 1
    with pytest.raises(PhoneLost):
        await run(pool, "r0")
    assert phones["p1"].served == []
    assert pool.running() == 0 and not pool._leased


async def test_a_second_failure_before_the_first_token_is_not_retried_again() -> None:
    pool, phones = make_pool(3)
    for p in phones.values():
        p.fail_before = 1
    with pytest.raises(PhoneLost):
        await run(pool, "r0")
    assert sum(len(p.served) for p in phones.values()) == 2


async def test_the_only_phone_may_serve_the_retry_of_its_own_failure() -> None:
    pool, phones = make_pool(1)
    phones["p0"].fail_before = 1
    events = await run(pool, "r0")
    assert phones["p0"].served == ["r0", "r0"] and isinstance(events[-1], Finished)


async def test_the_only_phone_failing_again_before_the_first_token_fails_the_request() -> None:
    """Retried once, however many phones: with one phone the retry set never grew past one key, so a
    phone that kept failing (a stall timeout it cannot meet, a crash on every request) took the request
    round and round through its restarts and quarantines until the queue timeout (issue 10)."""
    pool, phones = make_pool(1)
    phones["p0"].fail_before = 5
    with pytest.raises(PhoneLost):
        await run(pool, "r0")
    assert phones["p0"].served == ["r0", "r0"]
    assert pool.running() == 0 and not pool._leased


@pytest.mark.parametrize("n_phones", [1, 2, 3])
@pytest.mark.parametrize("failures", [1, 2, 4])
async def test_a_request_runs_on_at_most_two_phones_whatever_fails(n_phones: int, failures: int) -> None:
    """The class of the defect above: every phone failing ``failures`` times before the first token,
    over any number of phones, a request is tried twice at most, then fails or finishes."""
    pool, phones = make_pool(n_phones)
    for p in phones.values():
        p.fail_before = failures
    try:
        await run(pool, "r0")
    except PhoneLost:
        pass
    assert sum(len(p.served) for p in phones.values()) == 2
    assert pool.running() == 0 and not pool._leased and pool.audit() == []


async def test_a_retry_goes_to_the_head_of_the_queue() -> None:
    pool, phones = make_pool(2)
    p0, p1 = phones["p0"], phones["p1"]
    p0.state = PhoneState.STARTING  # not serving yet
    p1.hold = True
    held = asyncio.ensure_future(run(pool, "h"))
    await until(lambda: pool.running() == 1)
    r0 = asyncio.ensure_future(run(pool, "r0"))
    await until(lambda: pool.queue_depth("m") == 1)
    later = asyncio.ensure_future(run(pool, "later"))
    await until(lambda: pool.queue_depth("m") == 2)
    p0.fail_before, p0.after_failure = 1, PhoneState.RESTARTING
    p0.set_state(PhoneState.READY)  # r0 gets p0 and fails before its first token; p0 restarts
    await until(lambda: p0.state is PhoneState.RESTARTING)
    p1.hold = False
    p1.release()
    await asyncio.gather(held, r0, later)
    assert p0.served == ["r0"] and p1.served == ["h", "r0", "later"]


async def test_waiters_fail_at_once_when_the_last_phone_of_their_model_goes_away() -> None:
    pool, phones = make_pool(1)
    phone = phones["p0"]
    phone.hold = True
    running = asyncio.ensure_future(run(pool, "r0"))
    await until(lambda: pool.running() == 1)
    waiter = asyncio.ensure_future(run(pool, "r1"))
    await until(lambda: pool.queue_depth("m") == 1)
    phone.set_state(PhoneState.OFFLINE)
    with pytest.raises(NoPhoneAvailable):
        await asyncio.wait_for(waiter, 1.0)
    phone.release()
    await running
    with pytest.raises(NoPhoneAvailable) as e:  # served until now: its phone may come back (not a 404)
        await run(pool, "r2")
    assert e.value.status_code == 503 and e.value.retry_after >= 1.0
    phone.hold = False
    phone.set_state(PhoneState.READY)  # plugged back in
    assert isinstance((await asyncio.wait_for(run(pool, "r3"), 1.0))[-1], Finished)


async def test_a_model_never_served_is_not_found_and_a_model_gone_is_unavailable() -> None:
    pool, phones = make_pool(1)
    with pytest.raises(ModelNotFound):
        await run(pool, "r0", model="never-served")
    phones["p0"].set_state(PhoneState.OFFLINE)  # every phone unplugged
    with pytest.raises(NoPhoneAvailable):
        await run(pool, "r1")
    with pytest.raises(ModelNotFound):  # still a 404: that name was never served
        await run(pool, "r2", model="never-served")
    assert pool.audit() == [] and pool.leased() == 0


async def test_queued_work_goes_to_the_remaining_phones_when_one_goes_away() -> None:
    pool, phones = make_pool(2)
    p0, p1 = phones["p0"], phones["p1"]
    p0.hold = p1.hold = True
    held = [asyncio.ensure_future(run(pool, f"h{i}")) for i in range(2)]
    await until(lambda: pool.running() == 2)
    queued = asyncio.ensure_future(run(pool, "q"))
    await until(lambda: pool.queue_depth("m") == 1)
    p0.release()
    p0.set_state(PhoneState.OFFLINE)  # unplugged as its request ends
    p1.hold = False
    p1.release()
    await asyncio.gather(*held, queued)
    assert p1.served[-1] == "q"


async def test_a_phone_gone_between_grant_and_start_sends_the_request_back_to_the_queue(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="server.scheduling.pool")
    pool, phones = make_pool(2)
    p0, p1 = phones["p0"], phones["p1"]
    p0.hold = p1.hold = True
    held = [asyncio.ensure_future(run(pool, f"h{i}")) for i in range(2)]
    await until(lambda: pool.running() == 2)
    queued = asyncio.ensure_future(run(pool, "q"))
    await until(lambda: pool.queue_depth("m") == 1)
    dispatch = pool._dispatch

    def dispatch_then_unplug() -> None:  # the granted phone goes away before "q" runs (no event)
        dispatch()
        for key, rid in pool._leased.items():
            if rid == "q" and phones[key].state is PhoneState.READY and not phones[key].served.count("q"):
                phones[key].state = PhoneState.RESTARTING
                monkeypatch.setattr(pool, "_dispatch", dispatch)

    monkeypatch.setattr(pool, "_dispatch", dispatch_then_unplug)
    p0.release()
    await until(lambda: p0.state is PhoneState.RESTARTING)
    p1.hold = False
    p1.release()
    await asyncio.wait_for(asyncio.gather(*held, queued), 2.0)
    assert p0.served == ["h0"] and p1.served == ["h1", "q"]
    assert "went away before it started" in caplog.text


async def test_a_cancelled_waiter_leaves_the_queue_and_frees_nothing_twice() -> None:
    pool, phones = make_pool(1)
    phones["p0"].hold = True
    running = asyncio.ensure_future(run(pool, "r0"))
    await until(lambda: pool.running() == 1)
    waiter = asyncio.ensure_future(run(pool, "r1"))
    await until(lambda: pool.queue_depth("m") == 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.queue_depth("m") == 0
    phones["p0"].release()
    await running
    assert not pool._leased


async def test_a_phone_added_later_serves_the_queue() -> None:
    pool, phones = make_pool(1)
    phones["p0"].hold = True
    running = asyncio.ensure_future(run(pool, "r0"))
    await until(lambda: pool.running() == 1)
    waiter = asyncio.ensure_future(run(pool, "r1"))
    await until(lambda: pool.queue_depth("m") == 1)
    new = DoublePhone("new", pool)
    phones["new"] = new
    pool.phone_changed(new)
    await asyncio.wait_for(waiter, 1.0)
    assert new.served == ["r1"]
    phones["p0"].release()
    await running


async def test_models_are_queued_separately() -> None:
    pool, phones = make_pool(2)
    phones["p1"].model = model_info("m-w8")
    phones["p0"].hold = True
    running = asyncio.ensure_future(run(pool, "r0"))
    await until(lambda: pool.running() == 1)
    await asyncio.wait_for(run(pool, "w", model="m-w8"), 1.0)  # not behind r0
    assert phones["p1"].served == ["w"]
    assert sorted(m.name for m in pool.models()) == ["m", "m-w8"]
    phones["p0"].release()
    await running


async def test_quarantined_phones_get_no_requests_but_keep_their_model_listed() -> None:
    pool, phones = make_pool(2)
    phones["p0"].set_state(PhoneState.QUARANTINED)
    for i in range(3):
        await run(pool, f"r{i}")
    assert phones["p0"].served == [] and len(phones["p1"].served) == 3
    assert pool.models()[0].phones == ["p0", "p1"]


def test_params_helper_is_what_the_pool_sees() -> None:
    assert params("x").request_id == "x"
