"""What the simulated model says: steering by the Qwen3.5 chat context, tool-call text, RNG."""

from __future__ import annotations

import json
import random
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from server.sim.generation import request_rng, steer, tool_call_text

GEN_THINK = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n"
GEN_NO_THINK = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
TOOLS = (
    '<|im_start|>system\n<tools>\n{"type": "function", "function": {"name": "f", "parameters": {}}}\n'
    "</tools><|im_end|>\n"
)


def test_thinking_follows_the_generation_prompt_unless_forced() -> None:
    on = steer(GEN_THINK, think=None, tool_call=None)
    assert (on.open_think, on.reason, on.close_think) == (False, True, True)
    off = steer(GEN_NO_THINK, think=None, tool_call=None)
    assert (off.open_think, off.reason, off.close_think) == (False, False, False)
    forced = steer(GEN_NO_THINK, think=True, tool_call=None)
    assert (forced.open_think, forced.reason, forced.close_think) == (True, True, True)
    # an opened <think> is always closed, even with reasoning switched off
    suppressed = steer(GEN_THINK, think=False, tool_call=None)
    assert (suppressed.reason, suppressed.close_think) == (False, True)


def test_tools_only_in_the_system_turn_and_not_after_a_tool_response() -> None:
    assert steer(TOOLS + GEN_NO_THINK, think=None, tool_call=None).tool is not None
    assert steer("<|im_start|>user\n<tools>\n{}\n</tools><|im_end|>\n", think=None, tool_call=None).tool is None
    after = TOOLS + "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
    assert steer(after, think=None, tool_call=None).tool is None
    assert steer(TOOLS, think=None, tool_call=False).tool is None


def test_tool_call_values_follow_the_schema() -> None:
    tool = {"name": "book", "parameters": {"type": "object", "required": ["city", "nights", "late", "kind"],
                                           "properties": {"city": {"type": "string"}, "nights": {"type": "integer"},
                                                          "late": {"type": "boolean"},
                                                          "kind": {"enum": ["suite", "room"]}}}}
    text = tool_call_text(tool, random.Random(0))
    lines = text.split("\n")
    assert lines[:2] == ["<tool_call>", "<function=book>"] and lines[-2:] == ["</function>", "</tool_call>"]
    params = dict(zip(lines[2:-2:3], lines[3:-2:3]))
    assert params["<parameter=city>"] == "Paris" and params["<parameter=nights>"].isdigit()
    assert params["<parameter=late>"] == "true" and params["<parameter=kind>"] == "suite"


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=12)
SCHEMA_KEYS = st.sampled_from(["type", "properties", "required", "enum", "items"])


@given(st.dictionaries(SCHEMA_KEYS, JSON, max_size=4), st.dictionaries(st.text(max_size=5), JSON, max_size=3), JSON)
def test_any_tool_the_server_passes_gives_a_call_not_a_crash(parameters: dict[str, Any], properties: dict[str, Any],
                                                            name: Any) -> None:
    """The tools come from the client (the server checks only their outline): a schema with
    ``properties: "x"`` crashed both simulated phones, one after the other (the pool's retry)."""
    for params in (parameters, {**parameters, "properties": properties}):
        for tool in ({"type": "function", "function": {"name": name, "parameters": params}},
                     {"function": params}, {"name": "f", "parameters": params}):
            json.dumps(tool)  # a tool as the prompt holds it
            text = tool_call_text(tool, random.Random(0))
            assert text.startswith("<tool_call>\n<function=") and text.endswith("</function>\n</tool_call>")


def test_rng_is_a_function_of_context_when_greedy_or_seeded() -> None:
    def draw(rng: random.Random) -> list[float]:
        return [rng.random() for _ in range(3)]

    assert draw(request_rng(b"ab", 0, None)) == draw(request_rng(b"ab", 0, 5))
    assert draw(request_rng(b"ab", 0, None)) != draw(request_rng(b"ac", 0, None))
    assert draw(request_rng(b"ab", 0.7, 5)) == draw(request_rng(b"ab", 0.7, 5))
    assert draw(request_rng(b"ab", 0.7, 5)) != draw(request_rng(b"ab", 0.7, 6))
