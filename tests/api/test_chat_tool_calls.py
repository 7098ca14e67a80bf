"""Tool calls that an agent must be able to trust, end to end (official client, uvicorn, simulated
phone): ``arguments`` is always strict JSON, and a call cut short (stop string, max tokens) is not
returned as a call, streamed or not.

The simulated phone calls the first tool of the prompt with the first ``enum`` value of each required
parameter (see server/sim/generation.py), which is how a test makes the model write any value text.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from server.serving.tokens import HostTokenizer
from tests.api.live_server import LiveServer

USER = {"role": "user", "content": "Weather in Paris for 3 days?"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "enum": [3]}},
    "required": ["city", "days"]}}}
CALL_TEXT = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n" \
            "</parameter>\n</function>\n</tool_call>"


def strict_loads(text: str) -> Any:
    """``json.loads`` as a strict parser reads JSON: no NaN/Infinity, numbers that fit a double."""

    def reject(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise ValueError(f"{number} does not fit a double")
        return value

    return json.loads(text, parse_constant=reject, parse_float=finite)


def create(live: LiveServer, **kw: Any) -> tuple[ChatCompletion, list[ChatCompletionChunk]]:
    """The same request non-streamed and streamed (the phone runs at temperature 0: same text)."""
    kw = {"model": live.model, "messages": [USER], "max_completion_tokens": 100, "temperature": 0, **kw}
    client = live.client()
    return client.chat.completions.create(**kw), list(client.chat.completions.create(**kw, stream=True))


def streamed(chunks: list[ChatCompletionChunk]) -> tuple[str, dict[int, list[str]], str | None]:
    """(content, {index: [name, arguments]}, finish_reason) reassembled from the chunks."""
    content, calls, finish = "", {}, None
    for c in chunks:
        if not c.choices:
            continue
        delta = c.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            entry = calls.setdefault(tc.index, ["", ""])
            entry[0] += (tc.function and tc.function.name) or ""
            entry[1] += (tc.function and tc.function.arguments) or ""
        finish = c.choices[0].finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize(
    ("schema", "written"),
    [
        ({"type": "number"}, "NaN"),
        ({"type": "number"}, "Infinity"),
        ({"type": "number"}, "-Infinity"),
        ({"type": "number"}, "1e999"),
        ({"type": "number"}, "-1e999"),
        ({"type": ["number", "null"]}, "NaN"),
        ({"type": "object"}, '{"a": NaN}'),
        ({"type": "array"}, "[1e999, Infinity]"),
        ({"type": ["integer", "number"]}, "Infinity"),
        ({"type": "object"}, '{"a": "\\ud800"}'),  # a lone surrogate cannot be sent as UTF-8
    ],
)
def test_arguments_are_strict_json_whatever_the_model_writes(
    live: LiveServer, phone_knobs: Any, schema: dict[str, Any], written: str
) -> None:
    phone_knobs(stop_rate=0.3)
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {**schema, "enum": [written]}}, "required": ["x"]}}}
    whole, chunks = create(live, tools=[tool])
    (call,) = whole.choices[0].message.tool_calls or []
    assert whole.choices[0].finish_reason == "tool_calls"
    assert strict_loads(call.function.arguments) == {"x": written}  # kept as the text the model wrote
    _, calls, finish = streamed(chunks)
    assert calls == {0: ["f", call.function.arguments]} and finish == "tool_calls"


def test_a_stop_string_inside_a_call_leaves_no_call(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    whole, chunks = create(live, tools=[WEATHER], stop=["<parameter=days>"])
    choice = whole.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content == CALL_TEXT[: CALL_TEXT.index("<parameter=days>")]  # what was written
    assert streamed(chunks) == (choice.message.content, {}, "stop")  # no tool-call delta was ever sent


def test_a_stop_string_after_the_function_keeps_the_complete_call(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    whole, chunks = create(live, tools=[WEATHER], stop=["</tool_call>"])
    (call,) = whole.choices[0].message.tool_calls or []
    assert strict_loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert whole.choices[0].finish_reason == "tool_calls" and whole.choices[0].message.content is None
    assert streamed(chunks) == ("", {0: ["get_weather", call.function.arguments]}, "tool_calls")


def test_max_tokens_inside_a_call_leaves_no_call(live: LiveServer, tokenizer: HostTokenizer,
                                                 phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    budget = len(tokenizer.encode(CALL_TEXT[: CALL_TEXT.index("Paris") + 3]))  # ends inside the body
    whole, chunks = create(live, tools=[WEATHER], max_completion_tokens=budget)
    choice = whole.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "length"
    content = choice.message.content or ""
    assert content.startswith("<tool_call>\n<function=get_weather>\n<parameter=") and CALL_TEXT.startswith(content)
    assert streamed(chunks) == (content, {}, "length")


@pytest.mark.parametrize("budget", [0, 3])
def test_a_forced_call_cut_by_max_tokens_is_no_call(live: LiveServer, phone_knobs: Any, budget: int) -> None:
    phone_knobs(stop_rate=0.3)
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole, chunks = create(live, tools=[WEATHER], tool_choice=choice, max_completion_tokens=budget)
    assert whole.choices[0].message.tool_calls is None and whole.choices[0].finish_reason == "length"
    content = whole.choices[0].message.content or ""
    assert "<function=get_weather>" not in content  # the pre-fill is the prompt's, not the reply's
    assert streamed(chunks) == (content, {}, "length")
