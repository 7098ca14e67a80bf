"""GET /metrics: the qhx: request metrics (vLLM's names), the gauges and the HTTP metrics move by the
right amounts, with the right labels, after requests through the openai client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from tests.api.live_server import LiveServer

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HISTOGRAMS = ("qhx:time_to_first_token_seconds", "qhx:e2e_request_latency_seconds", "qhx:request_queue_time_seconds")


def scrape(base_url: str) -> Samples:
    r = httpx.get(base_url + "/metrics", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples) -> Callable[..., float]:
    return lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)


def labels(live: LiveServer) -> dict[str, str]:
    return {"model_name": live.model, "phone": live.devices()[0]["serial"]}


def wait_for(check: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_completion_counts_tokens_reason_and_latencies(live: LiveServer) -> None:
    lab = labels(live)
    before = scrape(live.base_url)
    r = live.client().completions.create(model=live.model, prompt="Count with me", max_tokens=8)
    d = delta(before, scrape(live.base_url))
    assert r.usage is not None
    assert d("qhx:prompt_tokens_total", **lab) == r.usage.prompt_tokens
    assert d("qhx:generation_tokens_total", **lab) == r.usage.completion_tokens == 8
    assert d("qhx:request_success_total", **lab, finished_reason="length") == 1
    assert d("qhx:request_success_total", **lab, finished_reason="stop") == 0
    for name in HISTOGRAMS:
        assert d(name + "_count", **lab) == 1, name
    # the request's own timeline: queued, then first token, then the end
    queue, ttft, e2e = (d(f"qhx:{name}_seconds_sum", **lab)
                        for name in ("request_queue_time", "time_to_first_token", "e2e_request_latency"))
    assert 0 <= queue <= ttft <= e2e < 5
    assert d("qhx:inter_token_latency_seconds_count", **lab) == 7  # a gap per token after the first


def test_streamed_chat_counts_the_same_way(live: LiveServer) -> None:
    lab = labels(live)
    before = scrape(live.base_url)
    stream = live.client().chat.completions.create(
        model=live.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage is not None][-1]
    d = delta(before, scrape(live.base_url))
    assert d("qhx:prompt_tokens_total", **lab) == usage.prompt_tokens
    assert d("qhx:generation_tokens_total", **lab) == usage.completion_tokens == 6
    assert d("qhx:request_success_total", **lab, finished_reason="length") == 1
    assert d("qhx:e2e_request_latency_seconds_count", **lab) == 1
    chat = {"handler": "/v1/chat/completions", "method": "POST"}
    assert d("http_requests_total", **chat, status="200") == 1
    assert d("http_request_duration_seconds_count", **chat) == 1


def test_stop_string_is_a_stop(live: LiveServer) -> None:
    lab = labels(live)
    full = live.client().completions.create(model=live.model, prompt="Hello", max_tokens=20, temperature=0)
    stop = full.choices[0].text.split()[len(full.choices[0].text.split()) // 2]
    before = scrape(live.base_url)
    r = live.client().completions.create(model=live.model, prompt="Hello", max_tokens=20, temperature=0, stop=stop)
    assert r.choices[0].finish_reason == "stop"
    d = delta(before, scrape(live.base_url))
    assert d("qhx:request_success_total", **lab, finished_reason="stop") == 1
    assert d("qhx:request_success_total", **lab, finished_reason="length") == 0


def test_client_going_away_is_an_abort(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(speed=1)  # ~22 tok/s: the stream is still running when the client leaves
    lab = labels(live)
    before = scrape(live.base_url)
    stream = live.client().completions.create(model=live.model, prompt="Go on", max_tokens=300, stream=True)
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    stream.close()
    wait_for(lambda: value(scrape(live.base_url), "qhx:request_success_total", **lab, finished_reason="abort")
             == value(before, "qhx:request_success_total", **lab, finished_reason="abort") + 1)
    d = delta(before, scrape(live.base_url))
    assert 2 <= d("qhx:generation_tokens_total", **lab) < 300
    assert d("qhx:request_success_total", **lab, finished_reason="length") == 0


async def test_gauges_show_the_running_request_and_the_waiting_one(live: LiveServer, phone_knobs: Any) -> None:
    lab = labels(live)
    idle = await asyncio.to_thread(scrape, live.base_url)
    assert idle[("qhx:num_requests_running", frozenset(lab.items()))] == 0  # there while idle, as 0
    assert ("qhx:num_requests_waiting", frozenset({("model_name", live.model)})) in idle
    phone_knobs(speed=1)
    async with live.async_client() as client:
        running = await client.completions.create(model=live.model, prompt="Go on", max_tokens=300, stream=True)
        await running.__anext__()  # the phone has it
        waiting = asyncio.ensure_future(client.completions.create(model=live.model, prompt="Hi", max_tokens=1))
        try:
            deadline = time.monotonic() + 3
            while True:
                busy = await asyncio.to_thread(scrape, live.base_url)
                if value(busy, "qhx:num_requests_waiting", model_name=live.model) == 1:
                    break
                assert time.monotonic() < deadline, "the second request never showed as waiting"
                await asyncio.sleep(0.02)
            assert value(busy, "qhx:num_requests_running", **lab) == 1
        finally:
            await running.close()
        assert (await waiting).usage is not None  # it got the phone once the first one left
    after = await asyncio.to_thread(scrape, live.base_url)
    assert value(after, "qhx:num_requests_waiting", model_name=live.model) == 0


def test_http_metrics_use_the_route_template(live: LiveServer) -> None:
    before = scrape(live.base_url)
    live.client().models.retrieve(live.model)
    try:
        live.client().models.retrieve("no-such-model")
    except openai.NotFoundError:
        pass
    httpx.get(live.base_url + "/no/such/path")
    httpx.post(live.base_url + "/health")
    d = delta(before, scrape(live.base_url))
    model = {"handler": "/v1/models/{model:path}", "method": "GET"}
    assert d("http_requests_total", **model, status="200") == 1
    assert d("http_requests_total", **model, status="404") == 1
    assert d("http_request_duration_seconds_count", **model) == 2
    assert d("http_requests_total", handler="none", method="GET", status="404") == 1  # not one label per path
    assert d("http_requests_total", handler="/health", method="POST", status="405") == 1


def test_every_app_has_its_own_registry(live: LiveServer) -> None:
    text = httpx.get(live.base_url + "/metrics").text
    assert "process_resident_memory_bytes" in text  # the process collector, in the app's registry
    assert text.count("# TYPE qhx:prompt_tokens_total counter") == 1
