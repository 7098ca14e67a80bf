"""ignore_eos and min_tokens (vLLM's extensions) in the stream driver: the phone is sent no stop ids,
and the host applies them (server/serving/driver.py, docs/api.md).

A real model does not stop at its end-of-sequence token when it is not told to: the token comes out
as any other and the text goes on. The double scripts exactly that: ids with EOS ids among them,
stopping only on the stop ids it was sent.
"""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from server.backends.base import GenerationParams
from server.serving.driver import Outcome, TextDelta, generate_text
from server.serving.tokens import HostTokenizer
from tests.serving.inprocess_phone_double import InProcessPhoneDouble

IM_END, ENDOFTEXT = 248046, 248044
EOS = [ENDOFTEXT, IM_END]


def params(max_new: int, *, ignore_eos: bool = False, min_tokens: int = 0) -> GenerationParams:
    return GenerationParams(request_id="cmpl-eos", model="m", prompt_ids=[1, 2, 3], max_new=max_new, stop_ids=EOS,
                            ignore_eos=ignore_eos, min_tokens=min_tokens)


async def run(phone: InProcessPhoneDouble, tok: HostTokenizer, p: GenerationParams,
              stop: list[str] | None = None) -> tuple[str, Outcome]:
    text, outcome = "", None
    async with contextlib.aclosing(generate_text(phone, p, tok, stop=stop or [])) as events:
        async for ev in events:
            if isinstance(ev, TextDelta):
                text += ev.text
            else:
                outcome = ev
    assert outcome is not None
    return text, outcome


async def test_ignore_eos_runs_past_the_end_tokens_to_max_tokens(qwen_tokenizer: HostTokenizer) -> None:
    ids = [*qwen_tokenizer.encode("Hi there."), IM_END, *qwen_tokenizer.encode(" More text here."), ENDOFTEXT,
           *qwen_tokenizer.encode(" And more.")]
    phone = InProcessPhoneDouble(ids)
    text, out = await run(phone, qwen_tokenizer, params(len(ids), ignore_eos=True))
    assert phone.params[0].stop_ids == []  # the phone is not asked to stop on them
    assert out.finish_reason == "length" and out.completion_tokens == len(ids)  # the EOS ids count
    assert text == "Hi there. More text here. And more."  # and are not shown
    assert "<|im_end|>" not in text


async def test_without_them_the_phone_stops_on_its_stop_ids_as_before(qwen_tokenizer: HostTokenizer) -> None:
    ids = [*qwen_tokenizer.encode("Hi there."), IM_END, *qwen_tokenizer.encode(" never")]
    phone = InProcessPhoneDouble(ids)
    text, out = await run(phone, qwen_tokenizer, params(len(ids)))
    assert phone.params[0].stop_ids == EOS and phone.cancelled == []
    assert text == "Hi there." and out.finish_reason == "stop"


async def test_min_tokens_passes_an_early_end_token_and_stops_at_the_first_one_after(
    qwen_tokenizer: HostTokenizer,
) -> None:
    a, b = qwen_tokenizer.encode("One two."), qwen_tokenizer.encode(" Three four five six seven eight.")
    ids = [*a, IM_END, *b, IM_END, *qwen_tokenizer.encode(" never shown")]
    phone = InProcessPhoneDouble(ids, delay_s=0.001)
    text, out = await run(phone, qwen_tokenizer, params(len(ids), min_tokens=len(a) + 2))
    assert text == "One two. Three four five six seven eight."
    assert out.finish_reason == "stop" and out.matched_stop is None
    assert out.completion_tokens == len(a) + 1 + len(b)  # the early EOS counts, the one that stopped does not
    assert phone.cancelled == ["cmpl-eos"] and phone.busy_with is None  # cancelled, and free by the outcome


async def test_an_end_token_exactly_at_min_tokens_stops(qwen_tokenizer: HostTokenizer) -> None:
    a = qwen_tokenizer.encode("One two three.")
    phone = InProcessPhoneDouble([*a, IM_END, *a])
    text, out = await run(phone, qwen_tokenizer, params(100, min_tokens=len(a)))
    assert text == "One two three." and out.finish_reason == "stop" and out.completion_tokens == len(a)


async def test_min_tokens_keeps_stop_strings_out_of_the_first_tokens(qwen_tokenizer: HostTokenizer) -> None:
    """vLLM looks for stop strings only once min_tokens tokens are out."""
    ids = qwen_tokenizer.encode("stop here, then more words and stop there for good")
    early = len(qwen_tokenizer.encode("stop here, then"))
    text, out = await run(InProcessPhoneDouble(ids), qwen_tokenizer, params(len(ids), min_tokens=early),
                          stop=["stop"])
    assert text == "stop here, then more words and " and out.finish_reason == "stop" and out.matched_stop == "stop"
    text, out = await run(InProcessPhoneDouble(ids), qwen_tokenizer, params(len(ids)), stop=["stop"])
    assert text == "" and out.matched_stop == "stop"


WORDS = ["Hi", " there", ".", " 世界", " 🎉", " ok", "\n\n"]


@settings(max_examples=60, deadline=None)
@given(pieces=st.lists(st.one_of(st.sampled_from(WORDS), st.sampled_from(EOS)), max_size=25),
       max_new=st.integers(1, 40), min_tokens=st.integers(0, 40), ignore_eos=st.booleans())
async def test_the_host_applies_ignore_eos_and_min_tokens_exactly(
    qwen_tokenizer: HostTokenizer, pieces: list[str | int], max_new: int, min_tokens: int, ignore_eos: bool,
) -> None:
    """Whatever the script: the generation ends at the first end token at or past min_tokens (never with
    ignore_eos), else at max_new or when the phone ends; the count includes the end tokens passed,
    not the one that stopped; the text is that of the other tokens."""
    min_tokens = min(min_tokens, max_new)
    ids: list[int] = []
    for piece in pieces:
        ids.extend([piece] if isinstance(piece, int) else qwen_tokenizer.encode(piece))
    text, out = await run(InProcessPhoneDouble(ids), qwen_tokenizer,
                          params(max_new, ignore_eos=ignore_eos, min_tokens=min_tokens))
    host_applies = ignore_eos or min_tokens > 0
    expected_ids = ids[:max_new]
    reason = "length"
    for k, i in enumerate(ids[:max_new]):
        if i in EOS and (not host_applies or (not ignore_eos and k >= min_tokens)):
            expected_ids, reason = ids[:k], "stop"
            break
    assert out.finish_reason == reason
    assert out.completion_tokens == len(expected_ids)
    assert text == qwen_tokenizer.decode([i for i in expected_ids if i not in EOS])
