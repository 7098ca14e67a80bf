"""The serving base (server/serving/base.py): the budget and context checks, usage and timings, the
shapes of bodies and chunks, across every endpoint family; and a new family made of its
differences only. On the in-process phone double (served_model.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.backends.base import GenerationParams, ModelInfo
from server.errors import ContextLengthExceeded
from server.serving.base import OpenAIServing, Prepared, Prompt, timings, usage
from server.serving.chat.protocol import ChatCompletionRequest
from server.serving.chat.service import ChatService
from server.serving.completions import CompletionService
from server.serving.driver import Outcome
from server.serving.models import ModelRegistry
from server.serving.protocol import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    GenerationRequest,
)
from server.serving.tokens import ENDOFTEXT, HostTokenizer
from tests.serving.inprocess_phone_double import InProcessPhoneDouble
from tests.serving.served_model import MODEL, ServedModel

# every endpoint family: its service, and a request body without the model
FAMILIES = {
    "completions": (CompletionService, CompletionRequest, {"prompt": "The capital of France is"}),
    "chat": (ChatService, ChatCompletionRequest, {"messages": [{"role": "user", "content": "Capital of France?"}]}),
}


def outcome(prompt: int, completion: int, phone: str = "p1", cached: int = 0) -> Outcome:
    return Outcome("length", prompt, completion, None, phone, {"queue_ms": 1.0, "decode_ms": 2.0}, cached)


def prepared(request: GenerationRequest) -> Prepared[Any, Any]:
    info = ModelInfo(MODEL, "fp16", 64, "", "")
    params = GenerationParams(request_id="x", model=MODEL, prompt_ids=[1], max_new=1)
    return Prepared(request, "x", 0, Prompt(info, None, "", []), params)  # type: ignore[arg-type]


async def run(service: OpenAIServing[Any, Any], request_type: type[GenerationRequest], body: dict[str, Any], *,
              include_usage: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The family's body for ``body``, and its chunks when streamed."""
    whole = json.loads(await service.complete(await service.prepare(request_type.model_validate(body))))
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    streamed = await service.prepare(request_type.model_validate({**body, "stream": True, **options}))
    return whole, [json.loads(chunk) async for chunk in service.stream(streamed)]


def test_usage_counts_the_prompt_once_and_every_choice_s_completion() -> None:
    assert usage([outcome(7, 3, cached=5), outcome(7, 5, cached=2)]).model_dump() == {
        "completion_tokens": 8, "prompt_tokens": 7, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 2}}
    assert usage([]).model_dump() == {"completion_tokens": 0, "prompt_tokens": 0, "total_tokens": 0,
                                      "prompt_tokens_details": {"cached_tokens": 0}}


def test_timings_are_one_timeline_per_choice_and_only_when_asked() -> None:
    asked = prepared(CompletionRequest(model=MODEL, return_timings=True))
    assert timings(asked, outcome(1, 1)) == {"phone": "p1", "queue_ms": 1.0, "decode_ms": 2.0}
    assert timings(asked, outcome(1, 1, "p1"), outcome(1, 1, "p2")) == {"choices": [
        {"phone": "p1", "queue_ms": 1.0, "decode_ms": 2.0}, {"phone": "p2", "queue_ms": 1.0, "decode_ms": 2.0}]}
    assert timings(prepared(CompletionRequest(model=MODEL)), outcome(1, 1)) is None


BUDGET_REQUESTS = [
    (lambda r: CompletionRequest(model=MODEL, max_tokens=r), "max_tokens"),
    (lambda r: ChatCompletionRequest(model=MODEL, messages=[], max_tokens=r), "max_tokens"),
    (lambda r: ChatCompletionRequest(model=MODEL, messages=[], max_completion_tokens=r), "max_completion_tokens"),
]


@given(max_context=st.integers(1, 64), n_prompt=st.integers(0, 80),
       requested=st.none() | st.integers(0, 80), which=st.sampled_from(BUDGET_REQUESTS))
def test_the_budget_fits_the_context_or_the_refusal_names_what_to_shorten(
    max_context: int, n_prompt: int, requested: int | None, which: Any,
) -> None:
    make, budget_param = which
    request = make(requested)
    prompt = Prompt(ModelInfo(MODEL, "fp16", max_context, "", ""), None, "", [0] * n_prompt)  # type: ignore[arg-type]
    fits = n_prompt < max_context if requested is None else n_prompt + requested <= max_context
    try:
        budget = OpenAIServing._max_new(request, prompt)
    except ContextLengthExceeded as exc:
        assert not fits
        assert exc.message.startswith(f"This model's maximum context length is {max_context} tokens. However, ")
        assert re.search(rf"(?<!\d){n_prompt}(?!\d)", exc.message.split("However, ")[1])
        prompt_alone = requested is None or n_prompt >= max_context
        assert exc.param == (request.context_wording.prompt_param if prompt_alone else budget_param)
        if not prompt_alone:
            assert f"{n_prompt + requested} tokens" in exc.message
    else:
        assert fits and n_prompt + budget <= max_context
        assert budget == (max_context - n_prompt if requested is None else requested)


@pytest.mark.parametrize("family", FAMILIES)
async def test_a_budget_of_zero_needs_no_phone(family: str, served: ServedModel, registry: ModelRegistry) -> None:
    service_type, request_type, body = FAMILIES[family]
    phone = served.reset(InProcessPhoneDouble([9707] * 5))
    whole, chunks = await run(service_type(served, registry), request_type, {"model": MODEL, "max_tokens": 0, **body})
    assert served.requests == [] and phone.sent == 0
    assert whole["choices"][0]["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("return_timings", [False, True])
async def test_usage_and_timings_appear_where_asked_in_every_family(
    family: str, include_usage: bool, return_timings: bool, served: ServedModel, registry: ModelRegistry,
    qwen_tokenizer: HostTokenizer,
) -> None:
    service_type, request_type, body = FAMILIES[family]
    reply = qwen_tokenizer.encode(" Paris, on the Seine.")
    served.reset(InProcessPhoneDouble(reply))
    body = {"model": MODEL, "n": 2, "temperature": 0.0, "max_tokens": 40, "return_timings": return_timings, **body}
    whole, chunks = await run(service_type(served, registry), request_type, body, include_usage=include_usage)

    n_prompt = whole["usage"]["prompt_tokens"]
    assert whole["usage"] == {"completion_tokens": 2 * len(reply), "prompt_tokens": n_prompt,
                              "total_tokens": n_prompt + 2 * len(reply), "prompt_tokens_details": {"cached_tokens": 0}}
    assert ("timings" in whole) is return_timings
    if return_timings:
        assert [t["phone"] for t in whole["timings"]["choices"]] == ["double-1", "double-1"]

    if include_usage:
        *chunks, end = chunks
        assert end["choices"] == [] and end["usage"] == whole["usage"] and "timings" not in end
    finishes = [c for c in chunks if c["choices"][0]["finish_reason"] is not None]
    assert sorted(c["choices"][0]["index"] for c in finishes) == [0, 1]
    for chunk in chunks:
        assert ("usage" in chunk) is include_usage and chunk.get("usage") is None
        assert ("timings" in chunk) is (return_timings and chunk in finishes)
    for finish in finishes if return_timings else []:
        assert finish["timings"]["phone"] == "double-1" and finish["timings"]["decode_ms"] == 2.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [1, 2])
async def test_cached_tokens_reach_usage_streamed_or_not_the_fewest_over_choices(
    family: str, n: int, served: ServedModel, registry: ModelRegistry, qwen_tokenizer: HostTokenizer,
) -> None:
    service_type, request_type, body = FAMILIES[family]
    # choice 1 of two finds less of the prompt on its phone than choice 0 (or the only choice)
    served.reset(InProcessPhoneDouble(qwen_tokenizer.encode(" Paris."),
                                      cached_tokens=lambda p: 2 if p.request_id.endswith("-1") else 4))
    body = {"model": MODEL, "n": n, "temperature": 0.0, "max_tokens": 10, **body}
    whole, chunks = await run(service_type(served, registry), request_type, body, include_usage=True)
    expected = {"cached_tokens": 4 if n == 1 else 2}
    assert whole["usage"]["prompt_tokens_details"] == expected
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens_details"] == expected


@pytest.mark.parametrize("family", FAMILIES)
async def test_cached_tokens_are_never_more_than_the_prompt_nor_negative(
    family: str, served: ServedModel, registry: ModelRegistry,
) -> None:
    service_type, request_type, body = FAMILIES[family]
    for said in (10**6, -3):
        served.reset(InProcessPhoneDouble([9707], cached_tokens=said))
        whole, _ = await run(service_type(served, registry), request_type, {"model": MODEL, "max_tokens": 1, **body})
        expected = whole["usage"]["prompt_tokens"] if said > 0 else 0
        assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] == expected, said


@pytest.mark.parametrize("family", FAMILIES)
async def test_with_no_phone_needed_nothing_is_cached(family: str, served: ServedModel, registry: ModelRegistry) -> None:
    service_type, request_type, body = FAMILIES[family]
    served.reset(InProcessPhoneDouble([9707], cached_tokens=3))
    whole, chunks = await run(service_type(served, registry), request_type, {"model": MODEL, "max_tokens": 0, **body},
                              include_usage=True)
    assert whole["usage"]["prompt_tokens_details"] == chunks[-1]["usage"]["prompt_tokens_details"] == {
        "cached_tokens": 0}


# -- a family of its differences only ---------------------------------------------------------------


@dataclass(slots=True)
class _Lines:
    index: int

    def admitted(self) -> Iterable[CompletionChoice]:
        return []

    def text(self, text: str) -> Iterable[CompletionChoice]:
        return [CompletionChoice(finish_reason=None, index=self.index, text=text)] if text else []

    def finished(self, outcome: Outcome) -> Iterable[CompletionChoice]:
        return [CompletionChoice(finish_reason=outcome.finish_reason, index=self.index, text="\n")]


class LineService(OpenAIServing[CompletionRequest, Prompt]):
    """A made-up family: the prompt is text only, every choice ends with a newline."""

    id_prefix = "line"
    stop_tokens = (ENDOFTEXT,)
    body_type = chunk_type = Completion

    async def _prompt(self, request: CompletionRequest) -> Prompt:
        info, tok = await self._model(request.model)
        assert isinstance(request.prompt, str)
        self._check_may_fit(request, request.prompt, info, tok)
        return Prompt(info, tok, request.prompt, await tok.encode_async(request.prompt))

    def _choice_stream(self, p: Prepared[CompletionRequest, Prompt], index: int) -> _Lines:
        return _Lines(index)

    async def complete(self, p: Prepared[CompletionRequest, Prompt]) -> str:
        texts = [[""] for _ in range(p.n)]
        outcomes = await self._collect(p, lambda i, text: texts[i].append(text))
        choices = [CompletionChoice(finish_reason=o.finish_reason, index=i, text="".join(texts[i]) + "\n")
                   for i, o in enumerate(outcomes)]
        return self._body_json(p, choices, outcomes)


async def test_a_new_family_needs_only_its_differences(
    served: ServedModel, registry: ModelRegistry, qwen_tokenizer: HostTokenizer,
) -> None:
    served.reset(InProcessPhoneDouble(qwen_tokenizer.encode(" Paris")))
    service = LineService(served, registry)
    body = {"model": MODEL, "prompt": "Capital?", "n": 2, "temperature": 0.0}
    whole, chunks = await run(service, CompletionRequest, body, include_usage=True)
    assert whole["id"].startswith("line-") and [c["text"] for c in whole["choices"]] == [" Paris\n"] * 2
    assert whole["usage"]["completion_tokens"] == 2 * len(qwen_tokenizer.encode(" Paris"))
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == " Paris\n Paris\n"
    assert chunks[-1]["usage"] == whole["usage"]
    served.reset(max_context=len(qwen_tokenizer.encode("Capital?")) + 1)
    with pytest.raises(ContextLengthExceeded) as caught:
        await service.prepare(CompletionRequest(model=MODEL, prompt="Capital?"))
    assert caught.value.param == "max_tokens"  # the budget (16 by default) does not fit next to the prompt
