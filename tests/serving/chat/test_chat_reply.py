"""The reply pipeline: think block, then content and tool calls, merged per feed."""

from __future__ import annotations

from server.serving.chat.reply import Reasoning, ReplyParser
from server.serving.chat.tools import ArgumentsDelta, CallStarted, Text, plan_tools

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"n": {"type": "integer"}}}}}]
CALL = "<tool_call>\n<function=f>\n<parameter=n>\n7\n</parameter>\n</function>\n</tool_call>"


def test_thinking_then_tool_call() -> None:
    reply = ReplyParser(plan_tools(TOOLS, None), thinking=True)
    pieces = reply.feed("Need f.\n</think>\n\nCalling.\n\n" + CALL) + reply.finish()
    assert [type(p) for p in pieces] == [Reasoning, Text, CallStarted, ArgumentsDelta]
    assert (reply.reasoning, reply.content) == ("Need f.", "Calling.")
    assert pieces[3] == ArgumentsDelta(0, '{"n": 7}')  # merged fragments
    assert [(c.name, c.arguments) for c in reply.calls] == [("f", '{"n": 7}')]


def test_tool_call_inside_reasoning_is_reasoning() -> None:
    reply = ReplyParser(plan_tools(TOOLS, None), thinking=True)
    reply.feed(CALL)
    reply.finish()
    assert reply.reasoning == CALL and reply.calls == []


def test_without_parsing_calls_are_content() -> None:
    for plan in (plan_tools(None, None), plan_tools(TOOLS, "none")):
        reply = ReplyParser(plan, thinking=False)
        reply.feed(CALL)
        reply.finish()
        assert reply.content == CALL and reply.calls == []


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    reply = ReplyParser(plan_tools(TOOLS, None), thinking=False, parallel_tool_calls=False)
    pieces = reply.feed(CALL + "\n" + CALL) + reply.finish()
    assert len(reply.calls) == 1
    assert {p.index for p in pieces if isinstance(p, (CallStarted, ArgumentsDelta))} == {0}


def test_character_by_character_equals_whole() -> None:
    text = "Let me see.\n</think>\n\nSure: " + CALL + "\n" + CALL.replace("7", "8")
    whole = ReplyParser(plan_tools(TOOLS, None), thinking=True)
    whole.feed(text)
    whole.finish()
    pieces = ReplyParser(plan_tools(TOOLS, None), thinking=True)
    for ch in text:
        pieces.feed(ch)
    pieces.finish()
    assert (pieces.reasoning, pieces.content) == (whole.reasoning, whole.content) == ("Let me see.", "Sure:")
    assert [(c.name, c.arguments) for c in pieces.calls] == [(c.name, c.arguments) for c in whole.calls]
    assert [c.arguments for c in whole.calls] == ['{"n": 7}', '{"n": 8}']
