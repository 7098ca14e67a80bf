"""generate_text: the shared driver, on an in-process phone double (see inprocess_phone_double.py)."""

from __future__ import annotations

import asyncio
import contextlib

import anyio
import pytest

from server.backends.base import GenerationParams
from server.errors import BackendError, Overloaded, PhoneLost, ProtocolViolation
from server.serving.driver import Outcome, TextDelta, generate_text
from server.serving.tokens import HostTokenizer
from tests.serving.inprocess_phone_double import InProcessPhoneDouble

EOS = [248044, 248046]


def params(max_new: int = 100, rid: str = "cmpl-test") -> GenerationParams:
    return GenerationParams(request_id=rid, model="m", prompt_ids=[1, 2, 3], max_new=max_new, stop_ids=EOS)


async def collect(backend: InProcessPhoneDouble, tok: HostTokenizer, *, stop: list[str] | None = None,
                  max_new: int = 100) -> tuple[list[TextDelta], Outcome]:
    deltas: list[TextDelta] = []
    outcome = None
    async with contextlib.aclosing(generate_text(backend, params(max_new), tok, stop=stop or [])) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                deltas.append(ev)
            else:
                outcome = ev
    assert outcome is not None
    return deltas, outcome


async def test_text_counts_and_length_finish(qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode("Hello 世界 🎉 done")
    phone = InProcessPhoneDouble(ids)
    deltas, out = await collect(phone, qwen_tokenizer)
    assert deltas[0] == TextDelta("", 0)  # admission comes first
    assert "".join(d.text for d in deltas) == "Hello 世界 🎉 done"
    assert all("\ufffd" not in d.text for d in deltas)
    assert out.finish_reason == "length" and out.completion_tokens == len(ids) and out.prompt_tokens == 3
    assert out.phone == "double-1" and out.timings["decode_ms"] == 2.0
    assert [d.token_count for d in deltas] == sorted(d.token_count for d in deltas)


async def test_stop_id_finishes_with_stop(qwen_tokenizer: HostTokenizer) -> None:
    ids = [*qwen_tokenizer.encode("Hi there"), 248046, *qwen_tokenizer.encode(" never")]
    deltas, out = await collect(InProcessPhoneDouble(ids), qwen_tokenizer)
    assert "".join(d.text for d in deltas) == "Hi there"
    assert out.finish_reason == "stop" and out.matched_stop is None
    assert out.completion_tokens == len(ids) - len(qwen_tokenizer.encode(" never")) - 1


async def test_stop_string_cuts_the_text_and_cancels_the_phone(qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode("one two\n\nUser: three four five six seven")
    phone = InProcessPhoneDouble(ids, delay_s=0.001)
    deltas, out = await collect(phone, qwen_tokenizer, stop=["\n\nUser:"])
    assert "".join(d.text for d in deltas) == "one two"
    assert out.finish_reason == "stop" and out.matched_stop == "\n\nUser:"
    assert phone.cancelled == ["cmpl-test"] and phone.cancel_confirmed == ["cmpl-test"]
    assert phone.busy_with is None  # free by the time the outcome is out
    assert out.completion_tokens < len(ids)


async def test_max_new_reached_is_length(qwen_tokenizer: HostTokenizer) -> None:
    _deltas, out = await collect(InProcessPhoneDouble(qwen_tokenizer.encode("abc")), qwen_tokenizer, max_new=1)
    assert out.finish_reason == "length" and out.completion_tokens == 1


async def test_cancelling_the_consumer_cancels_the_phone_even_under_anyio(qwen_tokenizer: HostTokenizer) -> None:
    """sse-starlette cancels with an anyio cancel scope, which re-cancels at every await: the phone's
    clean-up (cancel, wait for done) must still complete."""
    phone = InProcessPhoneDouble(qwen_tokenizer.encode("word " * 200), delay_s=0.005, done_after_cancel_s=0.05)
    got: list[str] = []

    async def consume() -> None:
        async with contextlib.aclosing(generate_text(phone, params(), qwen_tokenizer, stop=[])) as events:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    got.append(ev.text)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        await asyncio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert got and phone.cancelled == ["cmpl-test"]
    assert phone.cancel_confirmed == ["cmpl-test"]  # the wait for `done` was not cut short
    assert phone.busy_with is None


async def test_plain_task_cancellation_cancels_the_phone(qwen_tokenizer: HostTokenizer) -> None:
    phone = InProcessPhoneDouble(qwen_tokenizer.encode("word " * 200), delay_s=0.005)

    async def consume() -> None:
        async for _ in generate_text(phone, params(), qwen_tokenizer, stop=[]):
            pass

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert phone.cancel_confirmed == ["cmpl-test"]


async def test_backend_error_after_some_text_propagates(qwen_tokenizer: HostTokenizer) -> None:
    phone = InProcessPhoneDouble(qwen_tokenizer.encode("a b c d e"), fail_after=3, error=PhoneLost("gone"))
    seen: list[str] = []
    with pytest.raises(PhoneLost):
        async for ev in generate_text(phone, params(), qwen_tokenizer, stop=[]):
            if isinstance(ev, TextDelta):
                seen.append(ev.text)
    assert "".join(seen) == "a b c"


async def test_admission_error_is_raised_before_anything(qwen_tokenizer: HostTokenizer) -> None:
    phone = InProcessPhoneDouble([], admission_error=Overloaded("full"))
    events = generate_text(phone, params(), qwen_tokenizer, stop=[])
    with pytest.raises(Overloaded):
        await events.__anext__()


async def test_phone_side_cancellation_is_an_error(qwen_tokenizer: HostTokenizer) -> None:
    phone = InProcessPhoneDouble(qwen_tokenizer.encode("abc"), done_reason="cancelled")
    with pytest.raises(BackendError):
        await collect(phone, qwen_tokenizer)


async def test_missing_done_is_a_protocol_violation(qwen_tokenizer: HostTokenizer) -> None:
    with pytest.raises(ProtocolViolation):
        await collect(InProcessPhoneDouble(qwen_tokenizer.encode("abc"), skip_done=True), qwen_tokenizer)


async def test_stop_string_usage_does_not_depend_on_how_fast_the_consumer_reads(
    qwen_tokenizer: HostTokenizer,
) -> None:
    """A stream reads token by token, a non-streamed request catches up in batches: same count, the
    tokens up to the one that completed the stop string (regression: every token in the batch)."""
    text = "one two\n\nUser: three four five six seven eight nine ten"
    ids = qwen_tokenizer.encode(text)
    end = text.index("User:") + len("User:")
    want = next(k + 1 for k in range(len(ids)) if len(qwen_tokenizer.decode(ids[: k + 1])) >= end)
    counts = []
    for pause in (0.0, 0.02):  # keeps up / falls behind the phone (which then sends batches)
        phone = InProcessPhoneDouble(ids, delay_s=0.002)
        got, outcome = "", None
        async with contextlib.aclosing(generate_text(phone, params(), qwen_tokenizer, stop=["\n\nUser:"])) as events:
            async for ev in events:
                if isinstance(ev, TextDelta):
                    got += ev.text
                    await asyncio.sleep(pause)
                else:
                    outcome = ev
        assert outcome is not None and got == "one two"
        counts.append(outcome.completion_tokens)
    assert counts == [want, want]


async def test_a_slow_consumer_gets_tokens_batched(qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode("alpha beta gamma delta epsilon zeta eta theta")
    phone = InProcessPhoneDouble(ids)
    deltas: list[TextDelta] = []
    async with contextlib.aclosing(generate_text(phone, params(), qwen_tokenizer, stop=[])) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                deltas.append(ev)
                await asyncio.sleep(0.01)  # the phone runs ahead meanwhile
    text_deltas = [d for d in deltas if d.text]
    assert "".join(d.text for d in text_deltas) == "alpha beta gamma delta epsilon zeta eta theta"
    assert len(text_deltas) < len(ids)
