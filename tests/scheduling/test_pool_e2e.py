"""The phone pool end to end: openai client -> uvicorn -> pool -> two real adb servers -> six
simulated phones (tests/scheduling/pool_stack.py draws them). Routing, n > 1, the queue's bounds and
FIFO order, phones crashing, quarantine, hotplug, /v1/devices."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.scheduling.pool_stack import FP16, W8, PoolStack, pool_stack

PROMPT = "Tell me about phones"


@pytest.fixture(scope="module")
def stack() -> Iterator[PoolStack]:
    with pool_stack() as ps:
        yield ps


@pytest.fixture(autouse=True)
def settled(stack: PoolStack) -> Iterator[None]:
    """Every test starts and ends with all phones idle (knobs are restored by the tests' blocks)."""
    stack.wait_all_idle()
    yield
    stack.wait_all_idle()


def fp16_phones(stack: PoolStack) -> set[str]:
    return {s for s, d in stack.devices().items() if d["model"] == FP16 and d["state"] != "offline"}


# --------------------------------------------------------------------------- routing and n > 1


async def test_concurrent_requests_spread_over_the_idle_phones_of_both_adb_servers(stack: PoolStack) -> None:
    with stack.knobs(slow_first_token_s=0.4):
        async with stack.async_client() as client:
            t0 = time.monotonic()
            results = await asyncio.gather(*(
                client.completions.create(model=FP16, prompt=PROMPT, max_tokens=2,
                                          extra_body={"return_timings": True})
                for _ in range(4)
            ))
            elapsed = time.monotonic() - t0
    phones = {r.model_extra["timings"]["phone"] for r in results}  # type: ignore[index]
    assert phones == fp16_phones(stack)  # one request per phone ...
    assert elapsed < 0.8 * 2  # ... at the same time
    devices = stack.devices()
    assert {devices[p]["adb_server"] for p in phones} == {lab.adb_server for lab in stack.labs}


def test_n_choices_fan_out_over_idle_phones_and_usage_counts_the_prompt_once(stack: PoolStack) -> None:
    with stack.knobs(slow_first_token_s=0.4):
        t0 = time.monotonic()
        r = stack.client().completions.create(model=FP16, prompt=PROMPT, max_tokens=3, n=4,
                                              extra_body={"return_timings": True})
        elapsed = time.monotonic() - t0
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" and c.text for c in r.choices)
    single = stack.client().completions.create(model=FP16, prompt=PROMPT, max_tokens=3)
    assert r.usage is not None and single.usage is not None
    assert r.usage.prompt_tokens == single.usage.prompt_tokens
    assert r.usage.completion_tokens == 4 * 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    timings = r.model_extra["timings"]["choices"]  # type: ignore[index]
    assert len({t["phone"] for t in timings}) == 4 and elapsed < 0.8 * 2


def test_more_choices_than_phones_run_in_turn(stack: PoolStack) -> None:
    r = stack.client().chat.completions.create(
        model=W8, messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=4, n=5, seed=3,
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3, 4]
    assert r.usage is not None and r.usage.completion_tokens == 20
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) > 1  # seeded choices differ (seed + index each)


def test_streamed_chat_choices_interleave_with_their_index(stack: PoolStack) -> None:
    with stack.knobs(speed=1):
        stream = stack.client().chat.completions.create(
            model=FP16, messages=[{"role": "user", "content": PROMPT}], max_completion_tokens=6, n=3,
            stream=True, stream_options={"include_usage": True},
        )
        chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == [] and usage.completion_tokens == 18
    indices = [c.choices[0].index for c in chunks[:-1]]
    assert sorted(set(indices)) == [0, 1, 2]
    assert indices != sorted(indices)  # interleaved, not one choice after the other
    for i in range(3):
        mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert [c.finish_reason for c in mine].count("length") == 1 and mine[-1].finish_reason == "length"
        assert "".join(c.delta.content or "" for c in mine)


def test_streamed_completion_choices_each_end_with_their_finish_chunk(stack: PoolStack) -> None:
    stream = stack.client().completions.create(model=W8, prompt=PROMPT, max_tokens=5, n=2, stream=True)
    by_index: dict[int, list[Any]] = {0: [], 1: []}
    for chunk in stream:
        by_index[chunk.choices[0].index].append(chunk.choices[0])
    for choices in by_index.values():
        assert choices[-1].finish_reason == "length" and "".join(c.text for c in choices)


# --------------------------------------------------------------------------- the queue's bounds, FIFO


async def test_a_full_queue_is_429_with_retry_after(stack: PoolStack) -> None:
    w8 = [stack.sim("a4"), stack.sim("b2")]
    with stack.tuned(max_queue=2), stack.knobs(w8, slow_first_token_s=3.0):
        async with stack.async_client() as client:

            async def hold() -> None:
                stream = await client.completions.create(model=W8, prompt=PROMPT, max_tokens=2, stream=True)
                async for _ in stream:
                    pass

            holders = []
            for _ in range(4):  # two on the phones, two waiting
                holders.append(asyncio.ensure_future(hold()))
                await asyncio.sleep(0.1)
            with pytest.raises(openai.RateLimitError) as e:
                await client.completions.create(model=W8, prompt=PROMPT, max_tokens=2, stream=True)
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
    headers = e.value.response.headers
    assert e.value.code == "queue_full" and int(headers["retry-after"]) >= 1
    assert float(headers["retry-after-ms"]) >= 1000


def test_a_request_waits_no_longer_than_the_queue_limit(stack: PoolStack) -> None:
    w8 = [stack.sim("a4"), stack.sim("b2")]
    body = {"model": W8, "prompt": PROMPT, "max_tokens": 2}
    with (
        stack.tuned(queue_timeout_s=0.5),
        stack.knobs(w8, slow_first_token_s=3.0),
        httpx.Client(base_url=stack.base_url, timeout=10) as http,
        http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s1,
        http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s2,
    ):
        assert s1.status_code == s2.status_code == 200  # both phones taken
        t0 = time.monotonic()
        r = http.post("/v1/completions", json=body)
        waited = time.monotonic() - t0
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_timeout"
    assert 0.5 <= waited < 2.0


async def test_waves_of_queue_timeouts_leave_no_phone_wedged(stack: PoolStack) -> None:
    """Issue 10: bursts larger than the phones can serve, a short queue timeout. A phone granted to a
    request just as its wait timed out was never given back: after a few waves every request got
    503 while /v1/devices showed the phones ready and idle."""
    w8 = [stack.sim("a4"), stack.sim("b2")]
    outcomes: collections.Counter[str] = collections.Counter()
    with stack.tuned(queue_timeout_s=1.0, max_queue=200):
        async with stack.async_client(timeout=60) as client:

            async def one() -> None:
                try:
                    await client.completions.create(model=W8, prompt=PROMPT, max_tokens=400)
                    outcomes["ok"] += 1
                except openai.APIStatusError as e:
                    outcomes[f"{e.status_code} {e.code}"] += 1

            for _ in range(3):
                await asyncio.wait_for(asyncio.gather(*(one() for _ in range(150))), 120)
    assert outcomes["ok"] > 0 and outcomes["503 queue_timeout"] > 0, outcomes
    assert set(outcomes) == {"ok", "503 queue_timeout"}, outcomes
    await asyncio.to_thread(stack.wait_all_idle)
    assert stack.pool_audit() == []  # at rest: no phone leased, nothing queued or running
    # both phones serve again, together: neither is held by a request long gone
    with stack.knobs(w8, slow_first_token_s=0.5), stack.tuned(queue_timeout_s=10.0):
        async with stack.async_client() as client:
            results = await asyncio.gather(*(
                client.completions.create(model=W8, prompt=PROMPT, max_tokens=2,
                                          extra_body={"return_timings": True})
                for _ in w8
            ))
    assert {r.model_extra["timings"]["phone"] for r in results} == {s.serial for s in w8}  # type: ignore[index]
    devices = await asyncio.to_thread(stack.devices)
    assert all(devices[s.serial]["state"] == "ready" for s in w8)


def test_waiting_requests_get_phones_in_arrival_order(stack: PoolStack) -> None:
    """Two w8 phones, eight requests at once: the order in which requests reach the pool is the order
    in which they get a phone (both taken from the server's own timeline). Each prompt is its own, so
    that no phone holds a prefix of one (with state reuse a request may rather wait, bounded, for the
    phone that does, and a later one take the free phone: docs/state-reuse.md, "Routing")."""
    with stack.knobs([stack.sim("a4"), stack.sim("b2")], slow_first_token_s=0.2):

        async def main() -> list[dict[str, Any]]:
            async with stack.async_client() as client:
                async def one(i: int) -> dict[str, Any]:
                    await asyncio.sleep(0.05 * i)
                    r = await client.completions.create(model=W8, prompt=f"{i} {PROMPT}", max_tokens=1,
                                                        extra_body={"return_timings": True})
                    return r.model_extra["timings"]  # type: ignore[index,no-any-return]

                return await asyncio.gather(*(one(i) for i in range(8)))

        # twice: the first burst is where each phone measures its per-token prompt cost with the slow first
        # token in it; until both have, the router may rightly wait for the phone that measured cheaper
        asyncio.run(main())
        timings = asyncio.run(main())
    arrived = sorted(range(8), key=lambda i: timings[i]["host_start_t_ms"])
    started = sorted(range(8), key=lambda i: timings[i]["host_start_t_ms"] + timings[i]["queue_ms"])
    assert arrived == started
    assert max(t["queue_ms"] for t in timings) > 150  # they did queue


# --------------------------------------------------------------------------- faults


async def test_a_phone_dying_before_the_first_token_is_invisible_to_the_client(stack: PoolStack) -> None:
    victim = stack.sim("a1")
    before = stack.device(victim)["failures"]
    with stack.knobs([victim], crash_after=0), stack.knobs(slow_first_token_s=0.2):
        async with stack.async_client() as client:
            results = await asyncio.gather(*(
                client.completions.create(model=FP16, prompt=PROMPT, max_tokens=3) for _ in range(4)
            ))
    assert all(r.choices[0].finish_reason == "length" for r in results)
    assert stack.device(victim)["failures"] > before or stack.device(victim)["state"] != "ready"
    stack.wait_devices("the crashed phone back", lambda ds: ds[victim.serial]["state"] == "ready")


async def test_a_phone_killed_mid_stream_ends_its_stream_cleanly_and_no_other(stack: PoolStack) -> None:
    victim = stack.sim("a2")
    outcomes: list[str] = []
    with stack.knobs(speed=1), stack.knobs([victim], crash_after=3):
        async with stack.async_client() as client:

            async def one() -> str:
                stream = await client.completions.create(model=FP16, prompt=PROMPT, max_tokens=12, stream=True)
                text, finish = "", None
                try:
                    async for chunk in stream:
                        text += chunk.choices[0].text
                        finish = chunk.choices[0].finish_reason or finish
                except openai.APIError:
                    return "error"
                return "completed" if finish == "length" and text else "incomplete"

            outcomes = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(8))), 30)
    assert outcomes.count("completed") + outcomes.count("error") == 8  # none hangs, none is cut silently
    assert 1 <= outcomes.count("error") <= 2  # the victim's requests only (8 over 4 phones)
    stack.wait_devices("the killed phone back", lambda ds: ds[victim.serial]["state"] == "ready")


def test_a_phone_failing_twice_in_a_row_is_quarantined_then_recovers(stack: PoolStack) -> None:
    victim = stack.sim("b2")  # a w8 phone; the other is a4
    with stack.knobs([victim], crash_after=0):
        deadline = time.monotonic() + 60
        i = 0
        client = stack.client()
        while stack.device(victim)["state"] != "quarantined":
            assert time.monotonic() < deadline, stack.device(victim)
            # prompts with nothing in common: no phone holds a part of the next (state reuse would rightly
            # keep sending it to a4, which does); two at a time, so that the victim gets one whenever it is
            # back, even when a4 measured a lower prompt cost (at speed 0 that is host noise)
            i += 2
            with ThreadPoolExecutor(2) as pool:
                replies = list(pool.map(lambda k: client.completions.create(
                    model=W8, prompt=f"{k}: {PROMPT}", max_tokens=2), (i, i + 1)))
            assert all(r.choices[0].finish_reason == "length" for r in replies)  # retried: never noticed
        health = stack.device(victim)
        assert health["failures"] >= 2 and health["retry_in_s"] > 0
        assert "134" in health["last_error"]  # the runtime's abort code
    # fixed: after the quarantine it is started again and serves
    stack.wait_devices("quarantine over", lambda ds: ds[victim.serial]["state"] == "ready", timeout=20)
    served = stack.device(victim)["tokens_served"]
    deadline = time.monotonic() + 10
    while stack.device(victim)["tokens_served"] == served:
        assert time.monotonic() < deadline
        i += 1
        stack.client().completions.create(model=W8, prompt=f"{i}: {PROMPT}", max_tokens=2)
    assert stack.device(victim)["failures"] == 0


# --------------------------------------------------------------------------- hotplug


async def test_phones_added_and_removed_under_load(stack: PoolStack) -> None:
    lab_a, lab_b = stack.labs
    gone = stack.sim("a3")
    results: list[str] = []
    stop = asyncio.Event()
    with stack.knobs(slow_first_token_s=0.1):
        async with stack.async_client() as client:

            async def worker() -> None:
                while not stop.is_set():
                    try:
                        stream = await client.completions.create(model=FP16, prompt=PROMPT, max_tokens=4,
                                                                 stream=True)
                        async for _ in stream:
                            pass
                        results.append("ok")
                    except openai.APIError as e:
                        results.append(f"error {type(e).__name__}: {e}")

            workers = [asyncio.ensure_future(worker()) for _ in range(6)]
            new = await asyncio.to_thread(lab_b.add_phone, sim_config={"slow_first_token_s": 0.1})
            devices = await asyncio.to_thread(stack.wait_devices, "the new phone serving", lambda ds: (
                new.serial in ds and ds[new.serial]["tokens_served"] > 0))
            assert devices[new.serial]["model"] == FP16
            await asyncio.to_thread(lab_a.remove_phone, gone.serial)
            await asyncio.to_thread(stack.wait_devices, "the removed phone offline", lambda ds: (
                ds[gone.serial]["state"] == "offline"))
            done = len(results)
            await asyncio.sleep(1.0)  # the remaining phones carry the load
            assert len(results) > done
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 20)
    errors = [r for r in results if r != "ok"]
    assert len(errors) <= 1, errors  # only a request cut after its first token may fail, cleanly
    model = stack.client().models.retrieve(FP16).model_extra  # type: ignore[union-attr]
    assert model is not None and gone.serial not in json.dumps(model["phones"])
    assert any(new.serial in p for p in model["phones"])


def test_a_model_whose_phones_are_all_unplugged_is_503_with_retry_after_not_404(stack: PoolStack) -> None:
    """Issue 10: with every phone of a model unplugged, requests got 404 model_not_found, which the
    openai clients take as permanent. A model served until now is 503 with Retry-After on every
    endpoint that names it; a name never served stays 404; plugged back in, it serves again."""
    w8 = [(stack.labs[0], stack.sim("a4")), (stack.labs[1], stack.sim("b2"))]
    client = stack.client()
    chat = [{"role": "user", "content": PROMPT}]
    try:
        for lab, sim in w8:
            lab.adb("disconnect", sim.serial)
        stack.wait_devices("the w8 phones offline", lambda ds: all(
            ds[sim.serial]["state"] == "offline" for _, sim in w8))
        calls = {
            "completion": lambda: client.completions.create(model=W8, prompt=PROMPT, max_tokens=2),
            "streamed completion": lambda: client.completions.create(model=W8, prompt=PROMPT, max_tokens=2,
                                                                     stream=True),
            "chat": lambda: client.chat.completions.create(model=W8, messages=chat, max_tokens=2),  # type: ignore[arg-type]
            "streamed chat": lambda: client.chat.completions.create(model=W8, messages=chat, max_tokens=2,  # type: ignore[arg-type]
                                                                    stream=True),
            "model": lambda: client.models.retrieve(W8),
            "n=2": lambda: client.completions.create(model=W8, prompt=PROMPT, max_tokens=2, n=2),
        }
        for what, call in calls.items():
            with pytest.raises(openai.InternalServerError) as e:
                call()
            response = e.value.response
            assert response.status_code == 503 and e.value.code == "no_phone_available", what
            assert int(response.headers["retry-after"]) >= 1 and int(response.headers["retry-after-ms"]) >= 1000
        r = httpx.post(stack.base_url + "/tokenize", json={"model": W8, "prompt": PROMPT}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_phone_available"
        with pytest.raises(openai.NotFoundError):  # a name never served: still 404
            client.completions.create(model="qwen3.5-9b", prompt=PROMPT, max_tokens=2)
        # /v1/models lists what can be served now; the other model is untouched
        assert [m.id for m in client.models.list()] == [FP16]
        assert client.completions.create(model=FP16, prompt=PROMPT, max_tokens=2).choices[0].text
    finally:
        for lab, sim in w8:
            lab.adb("connect", sim.serial)
        stack.wait_devices("the w8 phones back", lambda ds: all(
            ds[sim.serial]["state"] == "ready" for _, sim in w8), timeout=60)
    assert sorted(m.id for m in client.models.list()) == sorted([FP16, W8])
    assert client.completions.create(model=W8, prompt=PROMPT, max_tokens=2).choices[0].finish_reason == "length"


# --------------------------------------------------------------------------- /v1/devices


async def test_devices_show_each_phone_its_bundles_its_request_and_its_counters(stack: PoolStack) -> None:
    async with stack.async_client() as client:
        await asyncio.gather(*(client.completions.create(model=m, prompt=PROMPT, max_tokens=2)
                               for m in (FP16, FP16, FP16, FP16, W8, W8)))  # every phone serves once
        with stack.knobs(slow_first_token_s=1.0):
            task = asyncio.ensure_future(client.completions.create(model=FP16, prompt=PROMPT, max_tokens=2))
            devices = await asyncio.to_thread(stack.wait_devices, "a request in flight", lambda ds: any(
                d["request_in_flight"] for d in ds.values()))
            [busy] = [d for d in devices.values() if d["request_in_flight"]]
            assert busy["state"] == "busy" and busy["request_in_flight"].startswith("cmpl-")
            await task
    devices = stack.devices()
    a4, b1 = devices[stack.sim("a4").serial], devices[stack.sim("b1").serial]
    assert a4["bundles"] == b1["bundles"] == ["qwen35", "qwen35-w8"]
    assert (a4["bundle"], a4["model"]) == ("qwen35-w8", W8)  # bundle_for
    assert (b1["bundle"], b1["model"]) == ("qwen35", FP16)  # the default: fp16
    for d in devices.values():
        if d["state"] == "offline":
            continue
        assert d["adb_server"] in {lab.adb_server for lab in stack.labs}
        assert d["product_model"].startswith("QHX-Sim") and d["soc"] == "SM8850" and d["mode"] == "session"
        assert d["uptime_s"] > 0 and d["tokens_served"] > 0 and d["last_decode_tps"] > 0


async def test_a_burst_of_streamed_choices_is_refused_with_429_never_a_200_then_queue_full(
    stack: PoolStack,
) -> None:
    """Issue 10 (adversarial pass): streamed n = 2 requests in a burst over a short queue. The stream
    committed to its 200 after a fixed 50 ms; on a loaded loop the second choice's refusal came later
    and the client got a 200 whose only event was ``queue_full``. Every stream is now either a 429 or
    a 200 that streams (class test over both endpoints)."""
    w8 = [stack.sim("a4"), stack.sim("b2")]
    firsts: collections.Counter[str] = collections.Counter()
    with stack.tuned(max_queue=3), stack.knobs(w8, slow_first_token_s=0.3):
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=60) as http:

            async def one(i: int) -> None:
                path, body = (
                    ("/v1/completions", {"prompt": PROMPT}) if i % 2 else
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})
                )
                body = {**body, "model": W8, "max_tokens": 3, "n": 2, "stream": True}
                async with http.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        firsts[f"{r.status_code}"] += 1
                        return
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            firsts["200 error" if '"error"' in line else "200 streams"] += 1
                            return

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(80))), 120)
    assert firsts["200 streams"] > 0 and firsts["429"] > 0, firsts
    assert set(firsts) == {"200 streams", "429"}, firsts
    await asyncio.to_thread(stack.wait_all_idle)
    assert stack.pool_audit() == []
