"""ResponseOutput: whatever the model writes and however the text is split, the events are numbered
0, 1, 2..., every item added is done, the official client's stream state machine (openai-python's
``ResponseStreamState``, what ``responses.stream()`` runs) accepts every event and rebuilds exactly
the body's output, and the body says what the reply parser parsed."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from openai import omit
from openai._models import construct_type
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent

from server.serving.chat.reply import ReplyParser
from server.serving.chat.tools import plan_tools
from server.serving.responses.output import ResponseOutput
from server.serving.responses.protocol import (
    FunctionCall,
    InputTokensDetails,
    OutputMessage,
    OutputTokensDetails,
    ReasoningItem,
    Response,
    ResponseUsage,
    StreamEvent,
)

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {
    "type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}}}]
USAGE = ResponseUsage(input_tokens=5, input_tokens_details=InputTokensDetails(), output_tokens=7,
                      output_tokens_details=OutputTokensDetails(), total_tokens=12)
WORDS = st.text(alphabet="ab c\n<>/=é😊", max_size=12)


def call_block(n: int, s: str) -> str:
    return f"<tool_call>\n<function=f>\n<parameter=n>\n{n}\n</parameter>\n<parameter=s>\n{s}\n</parameter>\n" \
           "</function>\n</tool_call>"


@st.composite
def replies(draw: st.DrawFn) -> tuple[bool, list[str]]:
    """(thinking, the generated text split into the deltas the phone sent)."""
    thinking = draw(st.booleans())
    text = ""
    if thinking:
        text += draw(WORDS) + ("\n</think>\n\n" if draw(st.booleans()) else "")
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()):
            text += call_block(draw(st.integers(-5, 99)), draw(st.text(alphabet="xy z", max_size=5)))
        else:
            text += draw(WORDS)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    return thinking, pieces


def run(thinking: bool, pieces: list[str], *, incomplete: bool) -> tuple[ResponseOutput, ReplyParser, list[StreamEvent]]:
    reply = ReplyParser(plan_tools(TOOLS, None), thinking=thinking)
    out = ResponseOutput(Response(id="resp_1", created_at=1, status="in_progress", model="m"), reply)
    events = out.started()
    for piece in pieces:
        events += out.text(piece)
    events += out.finish(incomplete=incomplete, usage=USAGE)
    return out, reply, events


def client_rebuilds(events: list[StreamEvent]) -> Any:
    """The official client's stream state fed our events (as parsed off the wire): its final response."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in events:
        state.handle_event(construct_type(type_=ResponseStreamEvent, value=json.loads(event.model_dump_json())))
    return state._completed_response


@settings(max_examples=150, deadline=None)
@given(replies(), st.booleans())
def test_events_rebuild_the_body_whatever_the_split(reply_case: tuple[bool, list[str]], incomplete: bool) -> None:
    thinking, pieces = reply_case
    out, reply, events = run(thinking, pieces, incomplete=incomplete)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    body = out.response
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = {e.output_index: e.item for e in events if e.type == "response.output_item.done"}  # type: ignore[attr-defined]
    assert added == sorted(done) == list(range(len(body.output)))
    assert [done[i] for i in added] == body.output  # each item as done is the item of the body
    assert events[-1].response == body  # type: ignore[attr-defined]
    # the body says what the parser parsed, in the parser's order
    reasoning = [i for i in body.output if isinstance(i, ReasoningItem)]
    messages = [i for i in body.output if isinstance(i, OutputMessage)]
    calls = [i for i in body.output if isinstance(i, FunctionCall)]
    assert "".join(i.content[0].text for i in reasoning) == reply.reasoning
    assert "".join(m.content[0].text for m in messages) == reply.content
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [(c.id, c.name, c.arguments) for c in reply.calls]
    assert all(json.loads(c.arguments) is not None for c in calls)
    kinds = [i.type for i in body.output]  # one item per run of text: never two messages in a row
    assert all(a != b or a == "function_call" for a, b in itertools.pairwise(kinds))
    assert kinds.count("reasoning") <= 1 and "reasoning" not in kinds[1:]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[attr-defined]
    assert deltas == reply.content
    if incomplete:
        assert body.status == "incomplete" and events[-1].type == "response.incomplete"
        return
    assert body.status == "completed" and (messages or calls)  # never an empty output when completed
    rebuilt = client_rebuilds(events)
    assert rebuilt is not None and rebuilt.status == "completed"
    assert said(json.loads(rebuilt.model_dump_json())["output"], json.loads(body.model_dump_json())["output"])


def said(theirs: Any, ours: Any) -> bool:
    """``theirs`` holds everything ``ours`` says (the client's types add fields of their own)."""
    if isinstance(ours, dict):
        return isinstance(theirs, dict) and all(k in theirs and said(theirs[k], v) for k, v in ours.items())
    if isinstance(ours, list):
        return isinstance(theirs, list) and len(theirs) == len(ours) and all(map(said, theirs, ours))
    return bool(theirs == ours)


def test_a_failure_mid_stream_closes_the_open_item() -> None:
    reply = ReplyParser(plan_tools(None, None), thinking=False)
    out = ResponseOutput(Response(id="resp_1", created_at=1, status="in_progress", model="m"), reply)
    events = [*out.started(), *out.text("Hello"), *out.fail("phone lost")]
    assert [e.type for e in events][-3:] == ["response.content_part.done", "response.output_item.done",
                                            "response.failed"]
    failed = events[-1].response  # type: ignore[attr-defined]
    assert failed.status == "failed" and failed.error.message == "phone lost" and failed.error.code == "server_error"
    assert failed.output[0].status == "incomplete" and failed.output[0].content[0].text == "Hello"
