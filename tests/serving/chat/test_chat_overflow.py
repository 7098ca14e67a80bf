"""``context_overflow: drop-oldest`` (server/serving/chat/overflow.py and ChatService): whole oldest
turns dropped after the system message, down to half the context at once, the cut found again by
later requests of the conversation so that the kept prefix stays the same while it fits; the usual
400 when not even the last turn fits. With the real template and tokenizer, on the in-process
phone double (served_model.py); tests/api/test_context_overflow.py checks the wire."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from server.errors import ContextLengthExceeded
from server.serving.chat.overflow import Turns, replay_cut, turn_positions
from server.serving.chat.protocol import ChatCompletionRequest, ChatMessage
from server.serving.chat.service import ChatService, RenderedPrompt
from server.serving.chat.template import ChatTemplate
from server.serving.models import ModelRegistry
from server.serving.tokens import IM_START, HostTokenizer
from tests.serving.served_model import MODEL, ServedModel

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
TEMPLATE = ChatTemplate.for_bundle(None)  # the built-in one


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


def call(city: str) -> list[dict[str, Any]]:
    """An assistant tool call and its result: two messages that belong together."""
    return [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": f"Sunny in {city}."}]


def messages(*items: dict[str, Any]) -> list[ChatMessage]:
    return [ChatMessage.model_validate(m) for m in items]


def rendered(items: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, *, thinking: bool = False) -> str:
    """The template's text for OpenAI messages (as the service converts them: arguments as objects)."""
    request = ChatCompletionRequest.model_validate({"model": MODEL, "messages": items})
    return TEMPLATE.render(request.template_messages(), tools, enable_thinking=thinking)


def chat(service: ChatService, msgs: list[dict[str, Any]], **body: Any) -> Any:
    return service.prepare(ChatCompletionRequest.model_validate({"model": MODEL, "messages": msgs, **body}))


@pytest.fixture
def service(served: ServedModel, registry: ModelRegistry) -> ChatService:
    served.reset(max_context=200)
    return ChatService(served, registry, context_overflow="drop-oldest")


def words(n: int, seed: str = "w") -> str:
    return " ".join(f"{seed}{i}" for i in range(n))


# -- turns ----------------------------------------------------------------------------------------


def test_a_turn_is_a_user_message_and_what_follows_it_tool_results_included() -> None:
    assert Turns.of(messages(SYSTEM, user("a"), assistant("b"), user("c"))) == Turns(1, (1, 3))
    assert Turns.of(messages(user("a"), *call("Paris"), assistant("d"), user("e"))) == Turns(0, (0, 4))
    assert Turns.of(messages({"role": "developer", "content": "x"}, assistant("hi"), user("a"))) == Turns(1, (1, 2))
    wrapped = user("<tool_response>\nSunny\n</tool_response>")  # tool results sent as a user message
    assert Turns.of(messages(user("a"), assistant("b"), wrapped, user("c"))) == Turns(0, (0, 3))
    assert Turns.of(messages(SYSTEM)) == Turns(1, ())
    assert Turns.of(messages(SYSTEM, user("a"), assistant("b"), user("c"))).dropped(1) == 2


ROLES = st.lists(st.sampled_from(["turn", "turn", "call", "reply"]), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.booleans(), tools=st.booleans(), plan=ROLES, thinking=st.booleans())
def test_turn_sizes_read_from_the_whole_render_are_exact(
    qwen_tokenizer: HostTokenizer, system: bool, tools: bool, plan: list[str], thinking: bool,
) -> None:
    """Every cut's prompt size, computed from the one render of the whole conversation, is the size
    of that cut rendered on its own: the replay decides on true numbers."""
    items: list[dict[str, Any]] = [SYSTEM] if system else []
    for i, step in enumerate(plan):
        items += [user(words(i % 3 + 1, f"u{i}"))] if step == "turn" else call(f"C{i}") if step == "call" else [
            assistant(words(2, f"a{i}"))]
    items.append(user("last"))
    msgs = messages(*items)
    turns = Turns.of(msgs)
    tool_list = [WEATHER] if tools else None

    def render(kept: list[dict[str, Any]]) -> str:
        return rendered(kept, tool_list, thinking=thinking)

    text = render(items)
    ids = qwen_tokenizer.encode(text)
    positions = turn_positions(ids, qwen_tokenizer.special_id(IM_START), msgs, turns,
                               system_block=text.startswith(f"{IM_START}system"))
    assert positions is not None
    assert positions.size(0, len(turns) - 1, whole=True) == len(ids)
    for first in range(len(turns)):
        kept = items[:turns.head] + items[turns.starts[first]:]
        assert positions.size(first, len(turns) - 1, whole=True) == len(qwen_tokenizer.encode(render(kept)))
        if items[turns.starts[first]]["role"] != "user":
            continue  # a first turn opened by the assistant was never a request of its own
        # the request that opened the first kept turn: its first message only
        opened = items[:turns.head] + items[turns.starts[first]:turns.starts[first] + 1]
        assert positions.size(first, first, whole=False) == len(qwen_tokenizer.encode(render(opened)))


def test_an_im_start_written_in_a_message_defeats_the_replay_not_the_prompt(qwen_tokenizer: HostTokenizer) -> None:
    items = [SYSTEM, user("a <|im_start|> b"), assistant("c"), user("d")]
    text = rendered(items)
    msgs = messages(*items)
    assert turn_positions(qwen_tokenizer.encode(text), qwen_tokenizer.special_id(IM_START), msgs, Turns.of(msgs),
                          system_block=True) is None


# -- the cut --------------------------------------------------------------------------------------


async def test_a_conversation_that_fits_is_sent_whole(service: ChatService) -> None:
    p = await chat(service, [SYSTEM, user("hi"), assistant("hello"), user("bye")], max_tokens=10)
    assert p.prompt.dropped == 0 and len(p.request.messages) == 4


async def test_the_oldest_turns_go_down_to_half_the_context_the_system_message_stays(
    service: ChatService, qwen_tokenizer: HostTokenizer,
) -> None:
    history = [SYSTEM]
    for i in range(5):
        history += [user(words(3, f"q{i}")), assistant(words(3, f"r{i}"))]
    size = len(qwen_tokenizer.encode(rendered([*history, user("short?")])))
    assert 100 < size <= 180  # the chat fit until now (and is over half the context)
    # the shortest question with which it does not fit any more (room for max_tokens 20)
    question = next(user(words(n, "long")) for n in range(1, 60)
                    if len(qwen_tokenizer.encode(rendered([*history, user(words(n, "long"))]))) + 20 > 200)
    p = await chat(service, [*history, question], max_tokens=20)
    prompt: RenderedPrompt = p.prompt
    assert 0 < prompt.dropped < 10 and prompt.dropped % 2 == 0  # whole turns: a question and its answer
    assert len(prompt.ids) <= 100  # half of 200, at once
    assert prompt.text.startswith(f"<|im_start|>system\n{SYSTEM['content']}<|im_end|>\n<|im_start|>user\n")
    assert prompt.text == rendered([SYSTEM, *history[1 + prompt.dropped:], question])
    # the fewest turns: one turn fewer dropped would be over half
    assert len(qwen_tokenizer.encode(rendered([SYSTEM, *history[1 + prompt.dropped - 2:], question]))) > 100
    assert p.params.prompt_ids == prompt.ids and p.params.max_new == 20


async def test_tool_calls_are_dropped_with_their_results(service: ChatService, served: ServedModel) -> None:
    served.reset(max_context=1024)  # the tools block alone is ~330 tokens
    history = [SYSTEM]
    for i in range(8):
        history += [user(words(30, f"q{i}")), *call(f"City{i}"), assistant(words(30, f"r{i}"))]
    p = await chat(service, [*history, user("and now?")], tools=[WEATHER], max_tokens=8)
    assert p.prompt.dropped > 0 and p.prompt.dropped % 4 == 0 and len(p.prompt.ids) + 8 <= 1024
    sent = p.request.messages  # the request as sent
    assert sent[1 + p.prompt.dropped].role == "user"


async def test_not_even_the_last_turn_fits_is_the_usual_400_for_the_conversation_as_sent(
    service: ChatService,
) -> None:
    items = [SYSTEM, user("hi"), assistant("hello"), user(words(150, "long"))]
    with pytest.raises(ContextLengthExceeded) as caught:
        await chat(service, items, max_tokens=10)
    assert caught.value.param in ("messages", "max_tokens")
    with pytest.raises(ContextLengthExceeded):  # nothing to drop at all
        await chat(service, [SYSTEM, user(words(250, "long"))])


async def test_a_conversation_too_large_to_tokenize_still_keeps_its_last_turns(service: ChatService) -> None:
    huge = [SYSTEM, user("x" * 200_000), assistant("y" * 200_000), user("z " * 150_000), assistant("ok"),
            user("short one"), assistant("fine"), user("last?")]  # 700 KB: over the bound for tokenizing
    p = await chat(service, huge, max_tokens=10)
    assert p.prompt.dropped == 4 and len(p.prompt.ids) <= 100


async def test_the_request_field_wins_over_the_server_setting(
    served: ServedModel, registry: ModelRegistry,
) -> None:
    served.reset(max_context=120)
    items = [SYSTEM, user(words(30, "a")), assistant(words(30, "b")), user("c?")]
    erring = ChatService(served, registry)  # the server's default: error
    with pytest.raises(ContextLengthExceeded):
        await chat(erring, items, max_tokens=10)
    assert (await chat(erring, items, max_tokens=10, context_overflow="drop-oldest")).prompt.dropped == 2
    dropping = ChatService(served, registry, context_overflow="drop-oldest")
    assert (await chat(dropping, items, max_tokens=10)).prompt.dropped == 2
    with pytest.raises(ContextLengthExceeded):
        await chat(dropping, items, max_tokens=10, context_overflow="error")


async def test_a_large_completion_budget_leaves_it_room(service: ChatService) -> None:
    history = [SYSTEM]
    for i in range(6):
        history += [user(words(8, f"q{i}")), assistant(words(8, f"r{i}"))]
    p = await chat(service, [*history, user("now?")], max_tokens=150)
    assert p.prompt.dropped > 0 and len(p.prompt.ids) + 150 <= 200


@pytest.mark.parametrize("value", ["drop-newest", "", "DROP-OLDEST", 1, True])
def test_an_unknown_policy_is_refused_naming_the_field(value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"model": MODEL, "messages": [user("hi")], "context_overflow": value})
    assert caught.value.errors()[0]["loc"] == ("context_overflow",)


# -- a conversation over many turns: the cut moves only when it must -------------------------------


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.tuples(st.integers(1, 25), st.integers(1, 25)), min_size=4, max_size=14),
       budget=st.sampled_from([None, 10, 40]))
def test_over_a_long_chat_the_kept_prefix_stays_until_it_no_longer_fits(
    qwen_tokenizer: HostTokenizer, lengths: list[tuple[int, int]], budget: int | None,
) -> None:
    """Each request of a growing chat (the previous one, its reply, a new question): the prompt fits;
    the cut moves later only when the conversation from the previous cut no longer fits, and then
    at once down to half the context (or to its last turn)."""
    max_context = 200
    room = 1 if budget is None else budget

    def size(items: list[dict[str, Any]]) -> int:
        return len(qwen_tokenizer.encode(rendered(items)))

    items: list[dict[str, Any]] = [SYSTEM]
    previous = 0  # messages dropped by the previous request
    for i, (q, a) in enumerate(lengths):
        items.append(user(words(q, f"q{i}")))
        msgs = messages(*items)
        turns = Turns.of(msgs)
        text = rendered(items)
        ids = qwen_tokenizer.encode(text)
        positions = turn_positions(ids, qwen_tokenizer.special_id(IM_START), msgs, turns, system_block=True)
        assert positions is not None
        first = replay_cut(positions, lambda n: n + room <= max_context, min(max_context // 2, max_context - room))
        dropped = turns.dropped(first) if first else 0
        kept = [SYSTEM, *items[1 + dropped:]]
        if size(kept) + room > max_context:  # only the last turn is left, and it does not fit
            assert first == len(turns) - 1
            break
        assert dropped >= previous  # the cut never moves back
        if dropped > previous:
            assert size([SYSTEM, *items[1 + previous:]]) + room > max_context  # it had to move
            assert size(kept) <= min(max_context // 2, max_context - room) or first == len(turns) - 1
        previous = dropped
        items.append(assistant(words(a, f"a{i}")))
