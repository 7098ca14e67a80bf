"""Chat prompt boundaries (server/serving/chat/boundaries.py), where the phone may keep its state for a
later request: the end of the system/tools block (shared) and the last message boundary, found on the
ids of prompts rendered with the real template and tokenized with the real Qwen3.5 tokenizer; sent in
``GenerationParams.boundaries`` by ChatService (and the end of the prompt by CompletionService)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.backends.base import Boundary
from server.serving.chat.boundaries import chat_boundaries
from server.serving.chat.protocol import ChatCompletionRequest
from server.serving.chat.service import ChatService
from server.serving.chat.template import ChatTemplate
from server.serving.completions import CompletionService
from server.serving.models import ModelRegistry
from server.serving.protocol import CompletionRequest
from server.serving.tokens import IM_START, HostTokenizer
from tests.serving.served_model import MODEL, ServedModel

SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one sentence."}
USER = {"role": "user", "content": "What is the weather in Paris?"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HEADER = "<|im_start|>assistant\n"  # the last boundary is past it: the next turn's reply opens with it too
OFF = "<think>\n\n</think>\n\n"  # what follows the last boundary: the generation prompt after its header
ON = "<think>\n"


@pytest.fixture
def service(served: ServedModel, registry: ModelRegistry) -> ChatService:
    return ChatService(served, registry)


async def boundaries(service: ChatService, tok: HostTokenizer, **body: Any) -> tuple[list[int], list[Boundary]]:
    """The prompt ids and boundaries that ChatService sends to the phone for ``body``."""
    p = await service.prepare(ChatCompletionRequest.model_validate({"model": MODEL, "max_tokens": 4, **body}))
    assert p.params.prompt_ids == tok.encode(p.prompt.text)
    return p.params.prompt_ids, p.params.boundaries


def text(tok: HostTokenizer, ids: list[int]) -> str:
    return tok.decode(ids)


async def test_system_and_tools_give_the_block_end_shared_and_the_last_message_boundary(
    service: ChatService, qwen_tokenizer: HostTokenizer,
) -> None:
    ids, found = await boundaries(service, qwen_tokenizer, messages=[SYSTEM, USER], tools=[WEATHER])
    assert [b.shared for b in found] == [True, False]
    block, last = found[0].at, found[1].at
    assert text(qwen_tokenizer, ids[:block]).startswith("<|im_start|>system\n# Tools")
    assert text(qwen_tokenizer, ids[:block]).endswith(f"{SYSTEM['content']}<|im_end|>\n")
    assert text(qwen_tokenizer, ids[block:last]) == f"<|im_start|>user\n{USER['content']}<|im_end|>\n{HEADER}"
    assert text(qwen_tokenizer, ids[last:]) == OFF


async def test_without_a_system_turn_only_the_last_message_boundary(
    service: ChatService, qwen_tokenizer: HostTokenizer,
) -> None:
    ids, found = await boundaries(service, qwen_tokenizer, messages=[USER])
    assert found == [Boundary(len(ids) - len(qwen_tokenizer.encode(OFF)))]
    assert text(qwen_tokenizer, ids[:found[0].at]).endswith(f"<|im_end|>\n{HEADER}")
    assert text(qwen_tokenizer, ids[found[0].at:]) == OFF


async def test_tools_alone_open_a_system_turn_that_is_shared(service: ChatService, qwen_tokenizer: HostTokenizer) -> None:
    ids, found = await boundaries(service, qwen_tokenizer, messages=[USER], tools=[WEATHER])
    assert [b.shared for b in found] == [True, False]
    assert text(qwen_tokenizer, ids[:found[0].at]).endswith("</IMPORTANT><|im_end|>\n")
    assert text(qwen_tokenizer, ids[found[0].at:]).startswith("<|im_start|>user\n")


async def test_the_shared_prefix_is_the_same_for_every_conversation_with_that_system_and_tools(
    service: ChatService, qwen_tokenizer: HostTokenizer,
) -> None:
    a, found_a = await boundaries(service, qwen_tokenizer, messages=[SYSTEM, USER], tools=[WEATHER])
    b, found_b = await boundaries(service, qwen_tokenizer, tools=[WEATHER], messages=[
        SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And in Rome?"}])
    assert found_a[0] == found_b[0] and a[:found_a[0].at] == b[:found_b[0].at]


async def test_multi_turn_the_last_boundary_is_past_the_generation_prompt_s_header_and_the_next_turn_starts_with_it(
    service: ChatService, qwen_tokenizer: HostTokenizer,
) -> None:
    turn1 = [SYSTEM, USER]
    ids1, found1 = await boundaries(service, qwen_tokenizer, messages=turn1)
    turn2 = [*turn1, {"role": "assistant", "content": "Sunny, 24 degrees."}, {"role": "user", "content": "Rome?"}]
    ids2, found2 = await boundaries(service, qwen_tokenizer, messages=turn2)
    assert found2[0] == found1[0] and found2[1].at > found1[1].at
    assert text(qwen_tokenizer, ids2[found2[1].at:]) == OFF
    # what the first turn keeps at its last boundary is where the second turn's prompt starts
    assert ids2[:found1[1].at] == ids1[:found1[1].at]


async def test_thinking_on_or_off_moves_nothing_but_the_generation_prompt(
    service: ChatService, qwen_tokenizer: HostTokenizer,
) -> None:
    off_ids, off = await boundaries(service, qwen_tokenizer, messages=[SYSTEM, USER])
    on_ids, on = await boundaries(service, qwen_tokenizer, messages=[SYSTEM, USER],
                                  chat_template_kwargs={"enable_thinking": True})
    assert on == off and on_ids[:on[1].at] == off_ids[:off[1].at]
    assert text(qwen_tokenizer, on_ids[on[1].at:]) == ON


@pytest.mark.parametrize(("choice", "prefill"), [
    ("required", "<tool_call>\n<function="),
    ({"type": "function", "function": {"name": "get_weather"}}, "<tool_call>\n<function=get_weather>\n"),
])
async def test_a_tool_choice_prefill_is_after_the_last_boundary(
    service: ChatService, qwen_tokenizer: HostTokenizer, choice: Any, prefill: str,
) -> None:
    ids, found = await boundaries(service, qwen_tokenizer, messages=[SYSTEM, USER], tools=[WEATHER],
                                  tool_choice=choice)
    assert [b.shared for b in found] == [True, False]
    assert text(qwen_tokenizer, ids[found[1].at:]) == OFF + prefill


async def test_a_completion_keeps_the_end_of_its_prompt(
    served: ServedModel, registry: ModelRegistry, qwen_tokenizer: HostTokenizer,
) -> None:
    service = CompletionService(served, registry)
    for prompt in ("The capital of France is", [1, 2, 3], "", None):
        p = await service.prepare(CompletionRequest.model_validate({"model": MODEL, "prompt": prompt}))
        assert p.params.boundaries == [Boundary(len(p.params.prompt_ids))], prompt


def test_boundaries_on_bare_ids() -> None:
    assert chat_boundaries([9, 1, 9, 2, 9, 3], 9, opens_with_system=True) == [Boundary(2, True), Boundary(4)]
    # with the newline id (5): past the last message's role line, when it is that near
    assert chat_boundaries([9, 1, 5, 9, 2, 5, 9, 4, 5, 7], 9, opens_with_system=True, newline=5) == [
        Boundary(3, True), Boundary(9)]
    assert chat_boundaries([9, 1, 5, 9, 2, 4, 5, 7], 9, opens_with_system=False, newline=5) == [Boundary(7)]
    assert chat_boundaries([9, 1, 5, 9, 2, 4, 4, 5], 9, opens_with_system=False, newline=5) == [Boundary(3)]
    assert chat_boundaries([9, 1, 9, 2, 9, 3], 9, opens_with_system=False) == [Boundary(4)]
    assert chat_boundaries([9, 1, 9, 2], 9, opens_with_system=True) == [Boundary(2, True)]  # one token, both
    assert chat_boundaries([1, 2, 3], 9, opens_with_system=True) == []
    assert chat_boundaries([9, 1], 9, opens_with_system=False) == []  # nothing before the only turn


# -- property: over random conversations ----------------------------------------------------------

WORDS = st.text(alphabet=st.sampled_from("abc xyz,.!?\n\u00e9\u4e2d\U0001f600"), min_size=1, max_size=30)
TEMPLATE = ChatTemplate.for_bundle(None)  # the built-in one
MESSAGE_PAIRS = st.lists(st.tuples(WORDS, WORDS), min_size=1, max_size=4)  # (user, assistant) turns


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.one_of(st.none(), WORDS), tools=st.booleans(), thinking=st.booleans(), turns=MESSAGE_PAIRS,
       last=WORDS)
def test_every_turn_s_last_boundary_is_a_prefix_of_the_next_turn_s_prompt(
    qwen_tokenizer: HostTokenizer, system: str | None, tools: bool, thinking: bool,
    turns: list[tuple[str, str]], last: str,
) -> None:
    template = TEMPLATE
    im_start = qwen_tokenizer.special_id(IM_START)
    [newline] = qwen_tokenizer.encode("\n")
    head = [{"role": "system", "content": system}] if system is not None else []
    messages = list(head)
    prompts: list[tuple[list[int], list[Boundary]]] = []
    for user, reply in [*turns, (last, "")]:
        messages.append({"role": "user", "content": user})
        rendered = template.render(messages, [WEATHER] if tools else None, enable_thinking=thinking)
        ids = qwen_tokenizer.encode(rendered)
        found = chat_boundaries(ids, im_start, opens_with_system=rendered.startswith(f"{IM_START}system"),
                                newline=newline)
        assert all(ids[b.at] == im_start for b in found[:-1])
        assert found[-1].shared is False and qwen_tokenizer.decode(ids[:found[-1].at]).endswith(
            "<|im_end|>\n<|im_start|>assistant\n")
        assert qwen_tokenizer.decode(ids[found[-1].at:]).startswith("<think>\n")
        assert [b.shared for b in found] == ([True, False] if system is not None or tools else [False])
        prompts.append((ids, found))
        messages.append({"role": "assistant", "content": reply})
    for (ids, found), (next_ids, next_found) in itertools.pairwise(prompts):
        keep = found[-1].at
        assert next_ids[:keep] == ids[:keep]
        assert found[:-1] == next_found[:-1]  # the shared block stays where it was
