"""CompletionService (server/serving/completions.py) driven directly: the prompt's four forms, the
context checks in completions' words, echo, the body and the chunks. On the in-process phone double
(served_model.py); tests/api/test_completions*.py check the same end to end over HTTP."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from server.errors import ContextLengthExceeded, InvalidRequest, UnsupportedParameter
from server.serving.completions import CompletionService, PreparedCompletion
from server.serving.models import ModelRegistry
from server.serving.protocol import CompletionRequest
from server.serving.tokens import ENDOFTEXT, IM_END, HostTokenizer
from tests.serving.inprocess_phone_double import InProcessPhoneDouble
from tests.serving.served_model import MODEL, ServedModel

PROMPT = "The capital of France is"


@pytest.fixture
def service(served: ServedModel, registry: ModelRegistry) -> CompletionService:
    return CompletionService(served, registry)


async def prepare(service: CompletionService, **body: Any) -> PreparedCompletion:
    return await service.prepare(CompletionRequest.model_validate({"model": MODEL, **body}))


async def complete(service: CompletionService, **body: Any) -> dict[str, Any]:
    body_json = await service.complete(await prepare(service, **body))
    return json.loads(body_json)  # type: ignore[no-any-return]


async def stream(service: CompletionService, **body: Any) -> list[dict[str, Any]]:
    prepared = await prepare(service, stream=True, **body)
    return [json.loads(chunk) async for chunk in service.stream(prepared)]


def says(served: ServedModel, tok: HostTokenizer, text: str, **kw: Any) -> list[int]:
    """Give the served model a phone that generates ``text``; its ids."""
    ids = tok.encode(text)
    served.reset(InProcessPhoneDouble(ids, **kw), max_context=served.max_context, mode=served.mode)
    return ids


async def test_a_text_prompt_runs_on_the_phone_and_the_body_has_openai_shape(
    service: CompletionService, served: ServedModel, qwen_tokenizer: HostTokenizer,
) -> None:
    ids = says(served, qwen_tokenizer, " Paris, a city on the Seine.")
    body = await complete(service, prompt=PROMPT, max_tokens=50)
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"] == [{"finish_reason": "length", "index": 0, "logprobs": None,
                                "text": " Paris, a city on the Seine."}]
    n_prompt = len(qwen_tokenizer.encode(PROMPT))
    assert body["usage"] == {"completion_tokens": len(ids), "prompt_tokens": n_prompt,
                             "total_tokens": n_prompt + len(ids), "prompt_tokens_details": {"cached_tokens": 0}}
    assert "timings" not in body


async def test_the_phone_request_carries_the_id_the_prompt_and_both_stop_ids(
    service: CompletionService, qwen_tokenizer: HostTokenizer,
) -> None:
    prepared = await prepare(service, prompt=PROMPT, max_tokens=7, temperature=0.5, seed=3)
    params = prepared.params
    assert params.request_id == prepared.id and params.model == MODEL
    assert params.prompt_ids == qwen_tokenizer.encode(PROMPT) and params.max_new == 7
    assert params.stop_ids == [qwen_tokenizer.special_id(ENDOFTEXT), qwen_tokenizer.special_id(IM_END)]
    assert (params.temperature, params.seed) == (0.5, 3)


async def test_every_prompt_form_is_the_same_prompt(service: CompletionService, qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode(PROMPT)
    for form in (PROMPT, [PROMPT], ids, [ids]):
        prepared = await prepare(service, prompt=form)
        assert (prepared.prompt.text, prepared.params.prompt_ids) == (PROMPT, ids), form


async def test_a_missing_or_empty_prompt_is_endoftext_and_echoes_nothing(
    service: CompletionService, qwen_tokenizer: HostTokenizer,
) -> None:
    for body in ({}, {"prompt": None}, {"prompt": ""}, {"prompt": []}):
        prepared = await prepare(service, echo=True, **body)
        assert prepared.params.prompt_ids == [qwen_tokenizer.special_id(ENDOFTEXT)], body
        assert prepared.prompt.echo == "", body


async def test_batched_prompts_are_refused_naming_the_prompt(service: CompletionService) -> None:
    with pytest.raises(UnsupportedParameter, match=r"send one prompt per request \(got 2\)") as caught:
        await prepare(service, prompt=["one", "two"])
    assert caught.value.param == "prompt"


async def test_token_ids_outside_the_vocabulary_are_refused(
    service: CompletionService, qwen_tokenizer: HostTokenizer,
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        await prepare(service, prompt=[1, qwen_tokenizer.vocab_size])
    assert caught.value.message == (f"Invalid token id {qwen_tokenizer.vocab_size} in prompt: ids must be in "
                                    f"[0, {qwen_tokenizer.vocab_size}).")
    assert caught.value.param == "prompt"


async def test_context_errors_are_in_openais_words_for_completions(
    service: CompletionService, served: ServedModel, qwen_tokenizer: HostTokenizer,
) -> None:
    served.reset(max_context=16)
    ten = qwen_tokenizer.encode("one two three four five six seven eight nine ten")[:10]
    cases = [
        ({"prompt": list(range(17))}, "prompt",
         "your prompt is 17 tokens, which leaves no room for the completion. Please reduce your prompt."),
        ({"prompt": list(range(16)), "max_tokens": None}, "prompt",
         "your prompt is 16 tokens, which leaves no room for the completion. Please reduce your prompt."),
        ({"prompt": ten, "max_tokens": 10}, "max_tokens",
         ("you requested 20 tokens (10 in your prompt; 10 for the completion). Please reduce your prompt; or "
          "completion length.")),
        ({"prompt": "x" * 100_000}, "prompt",
         (f"your prompt (100000 bytes) is at least {qwen_tokenizer.min_tokens('x' * 100_000)} tokens. Please reduce "
          "your prompt.")),
    ]
    for body, param, said in cases:
        with pytest.raises(ContextLengthExceeded) as caught:
            await prepare(service, **body)
        assert caught.value.message == f"This model's maximum context length is 16 tokens. However, {said}"
        assert caught.value.param == param


async def test_no_max_tokens_means_as_many_as_fit(service: CompletionService, served: ServedModel) -> None:
    served.reset(max_context=16)
    prepared = await prepare(service, prompt=list(range(10)), max_tokens=None)
    assert prepared.params.max_new == 6


async def test_echo_comes_before_each_choice_and_first_in_the_stream(
    service: CompletionService, served: ServedModel, qwen_tokenizer: HostTokenizer,
) -> None:
    says(served, qwen_tokenizer, " Paris.")
    body = await complete(service, prompt=PROMPT, echo=True, n=2, temperature=0.0)
    assert [c["text"] for c in body["choices"]] == [PROMPT + " Paris."] * 2
    chunks = await stream(service, prompt=PROMPT, echo=True, n=2, temperature=0.0)
    for index in (0, 1):
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == index]
        assert texts[0] == PROMPT and "".join(texts) == PROMPT + " Paris."


async def test_a_stop_string_cuts_the_text_and_finishes_with_stop(
    service: CompletionService, served: ServedModel, qwen_tokenizer: HostTokenizer,
) -> None:
    says(served, qwen_tokenizer, " Paris.\n\nQ: And Spain?")
    body = await complete(service, prompt=PROMPT, max_tokens=50, stop="\n\n")
    assert body["choices"][0]["text"] == " Paris." and body["choices"][0]["finish_reason"] == "stop"
    chunks = await stream(service, prompt=PROMPT, max_tokens=50, stop=["\n\n"])
    assert "".join(c["choices"][0]["text"] for c in chunks) == " Paris."
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"


async def test_the_stream_is_text_chunks_then_one_finish_chunk(
    service: CompletionService, served: ServedModel, qwen_tokenizer: HostTokenizer,
) -> None:
    says(served, qwen_tokenizer, " Paris, of course.")
    chunks = await stream(service, prompt=PROMPT, max_tokens=50)
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    *texts, finish = [c["choices"][0] for c in chunks]
    assert all(t["finish_reason"] is None and t["text"] for t in texts)
    assert "".join(t["text"] for t in texts) == " Paris, of course."
    assert finish == {"finish_reason": "length", "index": 0, "logprobs": None, "text": ""}


async def test_phones_that_run_one_shot_say_what_they_ignore(service: CompletionService, served: ServedModel) -> None:
    served.reset(mode="oneshot")
    assert (await prepare(service, prompt=PROMPT, temperature=0.7, top_p=0.9)).ignored == ["temperature", "top_p"]
    assert (await prepare(service, prompt=PROMPT, temperature=0.0, n=2)).ignored == []
    with pytest.raises(UnsupportedParameter) as caught:
        await prepare(service, prompt=PROMPT, temperature=0.7, n=2)
    assert caught.value.param == "n"
    served.reset(mode="session")
    assert (await prepare(service, prompt=PROMPT, temperature=0.7, n=2)).ignored == []


async def test_unknown_fields_are_logged_on_the_completions_logger(
    service: CompletionService, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="server.serving.completions"):
        prepared = await prepare(service, prompt=PROMPT, qhx_not_a_field=1)
    assert [r.getMessage() for r in caplog.records if r.name == "server.serving.completions"] == [
        f"request {prepared.id}: ignoring unknown fields ['qhx_not_a_field']"
    ]
