"""generate_text records each generation once, however it ends: the qhx: metrics (only when a phone
started it) and the request's log fields. On the in-process phone double (inprocess_phone_double.py);
the API tests check the same numbers end to end through /metrics."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from prometheus_client import CollectorRegistry

from server.backends.base import GenerationParams
from server.errors import Overloaded, PhoneLost
from server.logs import request_context
from server.serving.driver import TextDelta, generate_text
from server.serving.metrics import ServingMetrics
from server.serving.tokens import HostTokenizer
from tests.serving.inprocess_phone_double import InProcessPhoneDouble

LABELS = {"model_name": "m", "phone": "double-1"}


def params(max_new: int = 100) -> GenerationParams:
    return GenerationParams(request_id="cmpl-m", model="m", prompt_ids=[1, 2, 3], max_new=max_new, stop_ids=[248046])


class Recorded:
    """One app's metrics and the request's log fields, as the stream driver left them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = ServingMetrics(self.registry)
        self.fields: dict[str, object] = {}

    def sample(self, name: str, **extra: str) -> float:
        return self.registry.get_sample_value(name, {**LABELS, **extra}) or 0.0


async def run(phone: InProcessPhoneDouble, tok: HostTokenizer, rec: Recorded, *, stop: list[str] | None = None,
              take: int | None = None) -> None:
    """Drive one generation inside a request context; ``take``: text deltas read before walking away."""
    with request_context("req-test") as fields:
        try:
            events = generate_text(phone, params(), tok, stop=stop or [], metrics=rec.metrics)
            async with contextlib.aclosing(events):
                got = 0
                async for ev in events:
                    got += isinstance(ev, TextDelta) and bool(ev.text)
                    if take is not None and got >= take:
                        break
        finally:
            rec.fields.update(fields)


async def test_length_counts_tokens_and_one_gap_per_token(qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode("one two three four five six")
    rec = Recorded()
    await run(InProcessPhoneDouble(ids, delay_s=0.002), qwen_tokenizer, rec)
    assert rec.sample("qhx:request_success_total", finished_reason="length") == 1
    assert rec.sample("qhx:prompt_tokens_total") == 3
    assert rec.sample("qhx:generation_tokens_total") == len(ids)
    assert rec.sample("qhx:inter_token_latency_seconds_count") == len(ids) - 1
    assert 0 < rec.sample("qhx:inter_token_latency_seconds_sum") < 1
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert rec.sample(f"qhx:{name}_seconds_count") == 1
    f = rec.fields
    assert f["id"] == "cmpl-m" and f["model"] == "m" and f["phone"] == "double-1"
    assert f["prompt_tokens"] == 3 and f["completion_tokens"] == len(ids)
    assert f["finish_reason"] == "length" and f["prefill_ms"] == 1.0 and f["decode_ms"] == 2.0
    assert isinstance(f["ttft_ms"], float) and isinstance(f["queue_ms"], float)


async def test_prompt_tokens_reused_are_prefix_cache_hits_and_the_log_s_reused(qwen_tokenizer: HostTokenizer) -> None:
    rec = Recorded()
    await run(InProcessPhoneDouble([9707, 9707], cached_tokens=2), qwen_tokenizer, rec)
    assert rec.sample("qhx:prefix_cache_queries_total") == 3  # the whole prompt, as vLLM counts queries
    assert rec.sample("qhx:prefix_cache_hits_total") == 2
    assert rec.fields["reused"] == 2
    await run(InProcessPhoneDouble([9707]), qwen_tokenizer, rec)  # a phone that held nothing of it
    assert rec.sample("qhx:prefix_cache_queries_total") == 6 and rec.sample("qhx:prefix_cache_hits_total") == 2
    assert rec.fields["reused"] == 0


async def test_stop_string_is_stop(qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode("one two\n\nthree four five")
    rec = Recorded()
    await run(InProcessPhoneDouble(ids, delay_s=0.001), qwen_tokenizer, rec, stop=["\n\n"])
    assert rec.sample("qhx:request_success_total", finished_reason="stop") == 1
    assert rec.sample("qhx:request_success_total", finished_reason="length") == 0
    assert rec.fields["finish_reason"] == "stop"


async def test_stop_string_counts_the_tokens_through_the_stop_only(qwen_tokenizer: HostTokenizer) -> None:
    """The phone runs ahead of the match (its tokens arrive in one batch): the tokens after the one
    that completed the stop string are neither in the usage nor in the counter."""
    ids = qwen_tokenizer.encode("one two\n\nthree four five six seven eight")
    through = next(k + 1 for k in range(len(ids)) if "\n\n" in qwen_tokenizer.decode(ids[: k + 1]))
    rec = Recorded()
    await run(InProcessPhoneDouble(ids), qwen_tokenizer, rec, stop=["\n\n"])
    assert through < len(ids)
    assert rec.sample("qhx:generation_tokens_total") == rec.fields["completion_tokens"] == through


async def test_consumer_walking_away_is_an_abort(qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode(" ".join(["word"] * 50))
    rec = Recorded()
    await run(InProcessPhoneDouble(ids, delay_s=0.001), qwen_tokenizer, rec, take=3)
    assert rec.sample("qhx:request_success_total", finished_reason="abort") == 1
    assert 3 <= rec.sample("qhx:generation_tokens_total") < len(ids)
    assert rec.fields["finish_reason"] == "abort"


async def test_cancelled_consumer_is_an_abort(qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode(" ".join(["word"] * 50))
    rec = Recorded()
    task = asyncio.ensure_future(run(InProcessPhoneDouble(ids, delay_s=0.01), qwen_tokenizer, rec))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rec.sample("qhx:request_success_total", finished_reason="abort") == 1
    assert rec.fields["finish_reason"] == "abort"


async def test_phone_failing_after_the_start_is_an_error(qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode("one two three four five")
    rec = Recorded()
    with pytest.raises(PhoneLost):
        await run(InProcessPhoneDouble(ids, fail_after=2, error=PhoneLost("gone")), qwen_tokenizer, rec)
    assert rec.sample("qhx:request_success_total", finished_reason="error") == 1
    assert rec.sample("qhx:generation_tokens_total") == 2
    assert rec.fields["finish_reason"] == "error"


async def test_refused_before_a_phone_started_is_not_counted(qwen_tokenizer: HostTokenizer) -> None:
    rec = Recorded()
    with pytest.raises(Overloaded):
        await run(InProcessPhoneDouble([], admission_error=Overloaded("full")), qwen_tokenizer, rec)
    assert not [s for m in rec.registry.collect() for s in m.samples]  # no series at all
    assert rec.fields["model"] == "m" and rec.fields["phone"] is None  # the log line still names the model
    assert rec.fields["reused"] is None  # no phone said what it held


async def test_without_a_request_context_nothing_is_noted(qwen_tokenizer: HostTokenizer) -> None:
    rec = Recorded()
    async for _ in generate_text(InProcessPhoneDouble([9707]), params(), qwen_tokenizer, stop=[], metrics=rec.metrics):
        pass
    assert rec.sample("qhx:request_success_total", finished_reason="length") == 1 and rec.fields == {}
