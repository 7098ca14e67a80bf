"""server/serving/protocol.py: what every request refuses before any service sees it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import InvalidRequest
from server.serving.chat.protocol import ChatCompletionRequest, TokenizeRequest
from server.serving.protocol import CompletionRequest, lone_surrogate_at

# JSON as the body parser returns it; text is any Unicode scalar value (never a surrogate)
unicode_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=6)
keys = st.text(st.characters(min_codepoint=ord("a"), max_codepoint=ord("z")), min_size=1, max_size=3)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | unicode_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)


def paths(value: Any, path: str = "") -> list[tuple[str, list[Any]]]:
    """Every (parameter name, route) of the strings inside ``value``."""
    if isinstance(value, str):
        return [(path, [])]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found = []
    for k, v in items:
        inner = (f"{path}.{k}" if path else k) if isinstance(k, str) else f"{path}[{k}]"
        found += [(name, [k, *route]) for name, route in paths(v, inner)]
    return found


@settings(max_examples=300)
@given(value=json_values, data=st.data())
def test_a_lone_surrogate_is_found_anywhere_and_named(value: Any, data: st.DataObject) -> None:
    body = {"model": "m", "x": value}
    assert lone_surrogate_at(body) is None
    name, route = data.draw(st.sampled_from(paths(body)))
    *parents, last = route
    holder: Any = body
    for step in parents:
        holder = holder[step]
    holder[last] = holder[last] + data.draw(st.sampled_from(["\ud800", "\udfff", "a\udc00b"]))
    assert lone_surrogate_at(body) == name


def test_keys_and_deep_nesting() -> None:
    assert lone_surrogate_at({"a": {"k\ud800": 1}}) == "a"  # a key cannot be named: its object is
    deep: list[Any] = []
    inner = deep
    for _ in range(100_000):  # deeper than the recursion limit
        inner.append([])
        inner = inner[0]
    inner.append("\ud800")
    assert lone_surrogate_at({"x": deep}) == "x" + "[0]" * 100_001
    pair = json.loads('{"pair": "\\ud83d\\ude80 é 日本"}')  # an escaped surrogate *pair* is one character
    assert lone_surrogate_at(pair) is None


@pytest.mark.parametrize(("model", "body", "param"), [
    (CompletionRequest, {"prompt": "a\ud800"}, "prompt"),
    (CompletionRequest, {"prompt": ["a\ud800"]}, "prompt[0]"),
    (CompletionRequest, {"prompt": "a", "stop": ["x", "\udfff"]}, "stop[1]"),
    (CompletionRequest, {"prompt": "a", "user": "\ud800"}, "user"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content[0].text"),
    (ChatCompletionRequest, {"messages": [], "tools": [{"type": "function", "function": {
        "name": "f", "description": "\ud800"}}]}, "tools[0].function.description"),
    (ChatCompletionRequest, {"messages": [], "chat_template_kwargs": {"v": ["\ud800"]}}, "chat_template_kwargs.v[0]"),
    (TokenizeRequest, {"prompt": "\ud800"}, "prompt"),
    (TokenizeRequest, {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
])
def test_every_request_refuses_a_lone_surrogate_naming_the_field(model: Any, body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        model.model_validate({"model": "m", **body})
    assert caught.value.param == param
    assert caught.value.status_code == 400
    caught.value.message.encode("utf-8")  # the message itself can be sent


CHAT_MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("model", "body", "param"), [
    (CompletionRequest, {"prompt": "x", "max_tokens": 5, "min_tokens": 6}, "max_tokens"),
    (ChatCompletionRequest, {"messages": CHAT_MESSAGES, "max_tokens": 5, "min_tokens": 6}, "max_tokens"),
    (ChatCompletionRequest, {"messages": CHAT_MESSAGES, "max_completion_tokens": 5, "max_tokens": 50,
                             "min_tokens": 6}, "max_completion_tokens"),
])
def test_min_tokens_over_the_budget_is_refused_naming_both(model: Any, body: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        model.model_validate({"model": "m", **body})
    assert err.value.param == "min_tokens" and param in err.value.message


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
def test_ignore_eos_and_min_tokens_reach_the_phone_parameters(model: Any) -> None:
    body = {"prompt": "x"} if model is CompletionRequest else {"messages": CHAT_MESSAGES}
    request = model.model_validate({"model": "m", **body, "max_tokens": 9, "ignore_eos": True, "min_tokens": 9})
    p = request.to_generation_params(request_id="r", model="m", prompt_ids=[1], max_new=9, stop_ids=[7])
    assert p.ignore_eos is True and p.min_tokens == 9 and p.stop_ids == [7]  # the driver strips them
    plain = model.model_validate({"model": "m", **body})
    q = plain.to_generation_params(request_id="r", model="m", prompt_ids=[1], max_new=9, stop_ids=[7])
    assert q.ignore_eos is False and q.min_tokens == 0


@pytest.mark.parametrize("model", [CompletionRequest, ChatCompletionRequest])
@pytest.mark.parametrize(("seed", "ok"), [(2**63 - 1, True), (-(2**63), True), (2**63, False), (-(2**63) - 1, False),
                                          (10**30, False)])
def test_a_seed_is_a_64_bit_integer(model: Any, seed: int, ok: bool) -> None:
    """The phone reads it as one: a larger one would fail on the phone (a 5xx) instead of here (a 400)."""
    body = {"prompt": "x"} if model is CompletionRequest else {"messages": CHAT_MESSAGES}
    if ok:
        assert model.model_validate({"model": "m", **body, "seed": seed}).seed == seed
    else:
        with pytest.raises(ValueError):
            model.model_validate({"model": "m", **body, "seed": seed})


def test_a_top_k_past_32_bits_means_all_tokens_and_reaches_the_phone_as_the_largest_32_bit_one() -> None:
    request = CompletionRequest.model_validate({"model": "m", "prompt": "x", "top_k": 10**30})
    p = request.to_generation_params(request_id="r", model="m", prompt_ids=[1], max_new=1, stop_ids=[])
    assert p.top_k == 2**31 - 1
