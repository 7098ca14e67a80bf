"""Tool plans and the Qwen3.5 tool-call parser, whole and in random pieces."""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from server.errors import InvalidRequest, UnsupportedParameter
from server.serving.chat.tools import (
    ArgumentsDelta,
    CallStarted,
    ParserEvent,
    Text,
    ToolCallParser,
    convert_value,
    new_call_id,
    plan_tools,
)

SCHEMAS: dict[str, dict[str, Any]] = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "metric": {"type": "boolean"},
            "where": {"type": "object"},
            "tags": {"type": "array"},
            "ratio": {"type": ["number", "null"]},
            "anything": {},
        },
    },
    "ping": {"type": "object", "properties": {}},
}

@st.composite
def chunked(draw: st.DrawFn, text: str) -> list[str]:
    """``text`` cut into random pieces, as a stream delivers it."""
    cuts = draw(st.sets(st.integers(min_value=1, max_value=max(1, len(text) - 1)), max_size=len(text)))
    bounds = [0, *sorted(c for c in cuts if c < len(text)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def run(pieces: list[str], *, prefill: str = "") -> tuple[str, list[tuple[str, str]], list[ParserEvent]]:
    """(content, [(name, arguments)] reassembled from the events as a client does, events)."""
    ids = (f"call_{i}" for i in itertools.count())
    parser = ToolCallParser(SCHEMAS, prefill=prefill, new_id=lambda: next(ids))
    events: list[ParserEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Text))
    calls: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, CallStarted):
            assert event.index == len(calls) and event.id == f"call_{event.index}"
            calls[event.index] = [event.name, ""]
        elif isinstance(event, ArgumentsDelta):
            calls[event.index][1] += event.fragment
    reassembled = [(name, args) for name, args in calls.values()]
    assert reassembled == [(c.name, c.arguments) for c in parser.calls]
    return content, reassembled, events


CASES: list[tuple[str, str, list[tuple[str, dict[str, Any]]]]] = [
    ("Hello there.", "Hello there.", []),
    (call("get_weather", city="Paris"), "", [("get_weather", {"city": "Paris"})]),
    (
        "Let me check.\n\n" + call("get_weather", city="Paris", days="3", metric="True") + "\n",
        "Let me check.",
        [("get_weather", {"city": "Paris", "days": 3, "metric": True})],
    ),
    (
        call("get_weather", city="A") + "\n" + call("ping"),
        "",
        [("get_weather", {"city": "A"}), ("ping", {})],
    ),
    (
        call("get_weather", city="two\nlines", where='{"lat": 1.5}', tags="[1, 2]", ratio="null", anything="7"),
        "",
        [("get_weather", {"city": "two\nlines", "where": {"lat": 1.5}, "tags": [1, 2], "ratio": None,
                          "anything": 7})],
    ),
    # values that do not fit the schema stay strings; unknown parameters stay strings
    (
        call("get_weather", days="three", where="[1]", unknown="42", city="42"),
        "",
        [("get_weather", {"days": "three", "where": "[1]", "unknown": "42", "city": "42"})],
    ),
    # not a call: content, tags and all
    ("Use the <tool_call> tag.", "Use the <tool_call> tag.", []),
    ("<tool_call>\nnot a function\n</tool_call>", "<tool_call>\nnot a function\n</tool_call>", []),
    ("a <tool_call", "a <tool_call", []),
    # broken bodies close the call with what it had; the rest is content
    (
        "<tool_call>\n<function=ping>\n<parameter=x>\n1\n</parameter>\nstray text",
        "stray text",
        [("ping", {"x": "1"})],
    ),
    # forgotten closing tags
    ("<tool_call>\n<function=ping>\n</function>\nAfter.", "After.", [("ping", {})]),
    ("<tool_call>\n<function=ping>\n</tool_call>", "", [("ping", {})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</function>", "",
     [("get_weather", {"city": "Oslo"})]),
    # cut short (stop string, max tokens, end of turn) inside a call: no call, the text is content
    *[(cut, cut, []) for cut in ["<tool_call>\n<function=get_weather>\n<parameter=city>\nBerl",
                                 "<tool_call>\n<function=get_weather>\n<parameter=ci"]],
    ("A " + call("ping") + "\n<tool_call>\n<function=ping>\n<parameter=x>\n1\n</parameter>\n</func",
     "A\n<tool_call>\n<function=ping>\n<parameter=x>\n1\n</parameter>\n</func", [("ping", {})]),
    ("<tool_call>\n<function=get_wea", "<tool_call>\n<function=get_wea", []),
    # complete once </function> is there, even when </tool_call> is not
    ("<tool_call>\n<function=ping>\n</function>\n</tool", "", [("ping", {})]),
    # whitespace around calls is dropped, other text kept
    ("  A  \n" + call("ping") + "\n\n B ", "  A\n\n B", [("ping", {})]),
    (call("ping") + "\n\n B", "B", [("ping", {})]),
    (call("ping") + "\n\n", "", [("ping", {})]),
    ("A\n\n", "A\n\n", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
def test_parse_whole(text: str, content: str, calls: list[tuple[str, dict[str, Any]]]) -> None:
    got_content, got_calls, _ = run([text])
    assert got_content == content
    assert [(name, json.loads(args)) for name, args in got_calls] == calls


@pytest.mark.parametrize(("text", "content", "calls"), CASES)
@settings(max_examples=30)
@given(data=st.data())
def test_parse_any_chunking_matches_whole(
    text: str, content: str, calls: list[tuple[str, dict[str, Any]]], data: st.DataObject
) -> None:
    got_content, got_calls, _ = run(data.draw(chunked(text)))
    assert got_content == content
    assert [(name, json.loads(args)) for name, args in got_calls] == calls


def test_streamed_events_are_openai_shaped() -> None:
    _, _, events = run(["Checking.\n\n", call("get_weather", city="Paris", days="2")])
    assert events == [
        Text("Checking."),
        CallStarted(0, "call_0", "get_weather"),
        ArgumentsDelta(0, '{"city": "Paris"'),
        ArgumentsDelta(0, ', "days": 2'),
        ArgumentsDelta(0, "}"),
    ]


def test_a_call_is_sent_only_once_it_is_complete() -> None:
    parser = ToolCallParser(SCHEMAS, new_id=lambda: "call_x")
    assert parser.feed("<tool_call>\n<function=pi") == []
    assert parser.feed("ng>\n<parameter=a>\n1\n</parameter>\n") == []
    assert parser.feed("</function>") == [CallStarted(0, "call_x", "ping"), ArgumentsDelta(0, '{"a": "1"'),
                                          ArgumentsDelta(0, "}")]
    assert parser.feed("\n</tool_call>") == [] and parser.finish() == []


CUT_CALLS = [("get_weather", {"city": "Paris", "days": "3"}, '{"city": "Paris", "days": 3}'),
             ("ping", {"a": "x"}, '{"a": "x"}')]


@pytest.mark.parametrize("prefill", ["", "<tool_call>\n<function=", "<tool_call>\n<function=get_weather>\n"])
@settings(max_examples=60)
@given(data=st.data())
def test_a_reply_cut_anywhere_has_only_complete_calls(prefill: str, data: st.DataObject) -> None:
    """Whatever ends a reply (stop string, max tokens, end of turn), at whatever character: the calls
    are the complete ones (``</function>`` seen) with all their arguments, no piece of another call was
    streamed (``run`` checks the streamed pieces against the calls), and the text of a call cut short
    is content (compared without whitespace, which is dropped around calls)."""
    blocks = [call(name, **params) for name, params, _ in CUT_CALLS]
    base = ("" if prefill else "Let me see.\n\n") + blocks[0] + "\n" + blocks[1]
    reply = base[len(prefill):]
    cut = len(prefill) + data.draw(st.integers(min_value=0, max_value=len(reply)))
    content, calls, _ = run(data.draw(chunked(reply[: cut - len(prefill)])), prefill=prefill)
    spans = [(base.index(b), base.index(b) + len(b)) for b in blocks]
    complete = [s for s in spans if base.index("</function>", s[0]) + len("</function>") <= cut]
    assert calls == [(name, arguments) for name, _, arguments in CUT_CALLS[: len(complete)]]
    remaining = base[:cut]
    for start, end in reversed(complete):
        remaining = remaining[:start] + remaining[min(end, cut):]
    if not complete:
        remaining = remaining[len(prefill):]  # the pre-fill is the prompt's
    assert "".join(content.split()) == "".join(remaining.split())


@settings(max_examples=300)
@given(st.lists(st.sampled_from(
    ["<tool_call>", "</tool_call>", "<function=ping>", "<function=", "</function>", "<parameter=a>",
     "</parameter>", "\n", " ", "x", "<", ">", "1", '"', "{"]
), max_size=40).map("".join), st.data())
def test_any_text_parses_without_error_and_chunking_does_not_matter(text: str, data: st.DataObject) -> None:
    whole = run([text])
    pieces = run(data.draw(chunked(text)))
    assert whole[:2] == pieces[:2]
    for _, arguments in whole[1]:
        assert isinstance(json.loads(arguments), dict)


def test_named_prefill_starts_the_call_and_tolerates_a_repeated_header() -> None:
    prefill = "<tool_call>\n<function=ping>\n"
    for reply in ["<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>",
                  call("ping", a="1")]:
        content, calls, events = run([reply], prefill=prefill)
        assert (content, calls) == ("", [("ping", '{"a": "1"}')])
        assert events[0] == CallStarted(0, "call_0", "ping")


def test_required_prefill_lets_the_model_name_the_tool() -> None:
    prefill = "<tool_call>\n<function="
    assert run(["ping>\n</function>\n</tool_call>"], prefill=prefill)[:2] == ("", [("ping", "{}")])
    assert run([call("ping")], prefill=prefill)[:2] == ("", [("ping", "{}")])
    # a reply that is no call at all is content, without the pre-fill
    assert run(["I cannot."], prefill=prefill)[:2] == ("I cannot.", [])


def test_call_ids_look_like_openai_ids() -> None:
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)


@pytest.mark.parametrize(
    ("raw", "schema", "value"),
    [
        ("3", {"type": "integer"}, 3),
        ("3.0", {"type": "integer"}, 3),
        ("3.5", {"type": "integer"}, "3.5"),
        ("3.5", {"type": "number"}, 3.5),
        ("3", {"type": "number"}, 3),
        ("TRUE", {"type": "boolean"}, True),
        ("false", {"type": "boolean"}, False),
        ("yes", {"type": "boolean"}, "yes"),
        ("null", {"type": ["string", "null"]}, None),
        ("null", {"type": "string"}, "null"),
        ('{"a": 1}', {"type": "object"}, {"a": 1}),
        ("[1]", {"type": "object"}, "[1]"),
        ("[1]", {"anyOf": [{"type": "array"}, {"type": "string"}]}, [1]),
        ("2", {"enum": [1, 2]}, 2),
        ("x", {"enum": ["x"]}, "x"),
        ("12", {}, 12),
        ("twelve", {}, "twelve"),
        ("12", None, "12"),
        # not strict JSON: the text the model wrote (a strict parser rejects NaN, Infinity, 1e999)
        ("NaN", {"type": "number"}, "NaN"),
        ("-Infinity", {"type": ["number", "null"]}, "-Infinity"),
        ("1e999", {"type": "number"}, "1e999"),
        ("Infinity", {}, "Infinity"),
        ('{"a": NaN}', {"type": "object"}, '{"a": NaN}'),
        ("[1E400]", {"type": "array"}, "[1E400]"),
        ('"\\ud800"', {}, '"\\ud800"'),
        # nested past the recursion limit: text, not a 500 (json.loads raises RecursionError)
        ("[" * 5000 + "]" * 5000, {"type": "array"}, "[" * 5000 + "]" * 5000),
        ('{"a":' * 5000 + "1" + "}" * 5000, {}, '{"a":' * 5000 + "1" + "}" * 5000),
        ("1e-999", {"type": "number"}, 0.0),  # underflow is a finite number
    ],
)
def test_convert_value(raw: str, schema: dict[str, Any] | None, value: Any) -> None:
    assert convert_value(raw, schema) == value
    assert type(convert_value(raw, schema)) is type(value)


def strict_loads(text: str) -> Any:
    """``json.loads`` as strict parsers read JSON: no NaN/Infinity, numbers that fit a double."""

    def reject(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    def finite(number: str) -> float:
        if not math.isfinite(value := float(number)):
            raise ValueError(f"{number} does not fit a double")
        return value

    return json.loads(text, parse_constant=reject, parse_float=finite)


# every kind of schema a parameter can have (and an undeclared parameter: None)
VALUE_SCHEMAS: list[dict[str, Any] | None] = [
    None, {}, {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
    {"type": "object"}, {"type": "array"}, {"type": ["number", "null"]}, {"type": ["integer", "string"]},
    {"anyOf": [{"type": "array"}, {"type": "number"}]}, {"oneOf": [{"type": "object"}]}, {"enum": [1.5, 2]},
]
# what a model may write as a value: JSON's edge cases, Python's JSON extensions, and anything else
VALUE_WORDS = ["NaN", "Infinity", "-Infinity", "1e999", "-1E400", "1e-999", "nan", "inf", "1" * 5000, "0",
               "-0.0", "1.5", "true", "null", "None", '"', "\\", "\\ud800", "\\udfff", "\\u0000", "[", "]",
               "{", "}", ":", ",", " ", "\n", '"a"', "é", "\U0001f600", "[" * 5000 + "]" * 5000]
value_texts = st.lists(st.sampled_from(VALUE_WORDS) | st.text(max_size=4), max_size=8).map("".join)


@settings(max_examples=300)
@given(schema=st.sampled_from(VALUE_SCHEMAS), value=value_texts, data=st.data())
def test_arguments_are_strict_json_for_any_value_text(schema: dict[str, Any] | None, value: str,
                                                      data: st.DataObject) -> None:
    """Whatever text the model writes as a value, ``arguments`` is strict JSON that can be sent as
    UTF-8, streamed (the concatenated fragments) and not (the call)."""
    schemas = {"f": {"type": "object", "properties": {} if schema is None else {"x": schema}}}
    text = f"<tool_call>\n<function=f>\n<parameter=x>\n{value}\n</parameter>\n</function>\n</tool_call>"
    assume("</parameter>" not in value and "</function>" not in value)
    for pieces in ([text], data.draw(chunked(text))):
        parser = ToolCallParser(schemas)
        events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
        (whole,) = parser.calls
        streamed = "".join(e.fragment for e in events if isinstance(e, ArgumentsDelta))
        assert streamed == whole.arguments
        whole.arguments.encode("utf-8")
        assert strict_loads(whole.arguments) == {"x": convert_value(value, schema)}


TOOLS = [
    {"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "b"}},
]


def test_plan_auto_none_required_named() -> None:
    assert plan_tools(None, None).rendered is None
    auto = plan_tools(TOOLS, None)
    assert (auto.rendered, auto.parse, auto.prefill) == (TOOLS, True, "")
    assert auto.schemas == {"a": {"type": "object"}, "b": {}}
    none = plan_tools(TOOLS, "none")
    assert (none.rendered, none.parse) == (TOOLS, False)
    required = plan_tools(TOOLS, "required")
    assert (required.rendered, required.prefill) == (TOOLS, "<tool_call>\n<function=")
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "b"}})
    assert (named.rendered, named.prefill) == ([TOOLS[1]], "<tool_call>\n<function=b>\n")


@pytest.mark.parametrize(
    ("tools", "choice", "error", "param"),
    [
        (None, "required", InvalidRequest, "tool_choice"),
        (TOOLS, {"type": "function", "function": {"name": "zzz"}}, InvalidRequest, "tool_choice"),
        (TOOLS, "sometimes", UnsupportedParameter, "tool_choice"),
        ([{"type": "custom", "custom": {"name": "x"}}], None, UnsupportedParameter, "tools[0].type"),
    ],
)
def test_plan_rejects(tools: list[dict] | None, choice: Any, error: type[Exception], param: str) -> None:
    with pytest.raises(error) as caught:
        plan_tools(tools, choice)
    assert caught.value.param == param  # type: ignore[attr-defined]
