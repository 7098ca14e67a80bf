"""Input items as chat messages: one assistant turn from reasoning/message/function_call items, tool
results, the system message, and a response's output turned back into the turn it was (the same
messages a client gets by sending that output back as input)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.errors import InvalidRequest, UnsupportedParameter
from server.serving.responses.items import assistant_turn, input_messages, system_message
from server.serving.responses.protocol import (
    FunctionCall,
    InputItem,
    OutputMessage,
    OutputText,
    ReasoningItem,
    ReasoningText,
)


def items(*raw: dict[str, Any]) -> list[InputItem]:
    return [InputItem.model_validate(r) for r in raw]


OUTPUT = [
    ReasoningItem(id="rs_1", status="completed", content=[ReasoningText(text="Need the weather.")]),
    OutputMessage(id="msg_1", status="completed", content=[OutputText(text="Let me look.")]),
    FunctionCall(id="fc_1", status="completed", call_id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
    FunctionCall(id="fc_2", status="completed", call_id="call_2", name="get_time", arguments="{}"),
]


def test_an_output_sent_back_as_input_is_the_turn_a_stored_response_continues_from() -> None:
    sent_back = input_messages(items(*[o.model_dump() for o in OUTPUT]), earlier=[])
    assert sent_back == assistant_turn(OUTPUT) == [{
        "role": "assistant", "content": "Let me look.", "reasoning_content": "Need the weather.",
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {}}},
        ],
    }]


@st.composite
def outputs(draw: st.DrawFn) -> list[Any]:
    """A response's output as ResponseOutput makes it (tests/serving/responses/test_responses_output.py):
    at most one reasoning item, first; then messages and function calls, never two messages in a row."""
    out: list[Any] = []
    if draw(st.booleans()):
        out.append(ReasoningItem(id="rs", status="completed", content=[ReasoningText(text=draw(st.text(max_size=5)))]))
    for k in range(draw(st.integers(0, 4))):
        if draw(st.booleans()) and not (out and isinstance(out[-1], OutputMessage)):
            out.append(OutputMessage(id=f"msg{k}", status="completed", content=[OutputText(text=draw(st.text(max_size=5)))]))
        else:
            out.append(FunctionCall(id=f"fc{k}", status="completed", call_id=f"call_{k}", name="f", arguments='{"k": 1}'))
    return out


@given(outputs())
def test_any_output_sent_back_as_input_is_the_turn_a_stored_response_continues_from(output: list[Any]) -> None:
    """Stateless clients (the whole conversation as input) and previous_response_id give one prompt:
    text after a call (the model wrote both in one turn) stays in that turn, as chat's parser has it."""
    assert input_messages(items(*[o.model_dump() for o in output]), earlier=[]) == assistant_turn(output)


def test_a_tool_loop_as_chat_messages() -> None:
    conversation = input_messages(items(
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "in Paris?"}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No more."}]},
    ), earlier=[])
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "assistant", "assistant"]
    assert conversation[0]["content"] == "Weather in Paris?" and conversation[2]["tool_call_id"] == "call_1"
    assert conversation[4]["content"] == "No more."  # a second message is a turn of its own


def test_a_tool_result_may_answer_a_call_of_the_stored_conversation() -> None:
    earlier = assistant_turn(OUTPUT)
    (tool,) = input_messages(items({"type": "function_call_output", "call_id": "call_2", "output": "noon"}), earlier)
    assert tool == {"role": "tool", "tool_call_id": "call_2", "content": "noon"}


def test_instructions_and_leading_system_messages_are_one_system_message() -> None:
    conversation = input_messages(items({"role": "developer", "content": "Be kind."},
                                        {"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "hi"}), earlier=[])
    assert system_message("You help.", conversation) == [
        {"role": "system", "content": "You help.\n\nBe kind.\n\nBe brief."}, {"role": "user", "content": "hi"}]
    assert system_message(None, conversation[2:]) == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("raw", "param", "error"),
    [
        ({"type": "item_reference", "id": "msg_1"}, "input[0].type", UnsupportedParameter),
        ({"type": "web_search_call", "id": "ws_1"}, "input[0].type", UnsupportedParameter),
        ({"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}, "input[0].content[0].type",
         UnsupportedParameter),
        ({"role": "user", "content": [{"type": "input_text"}]}, "input[0].content[0].text", InvalidRequest),
        ({"role": "tool", "content": "x"}, "input[0].role", InvalidRequest),
        ({"role": "user"}, "input[0].content", InvalidRequest),
        ({"type": "function_call", "name": "f", "arguments": "{}"}, "input[0].call_id", InvalidRequest),
        ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}, "input[0].arguments", InvalidRequest),
        ({"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"x": NaN}'}, "input[0].arguments",
         InvalidRequest),
        ({"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"x": "\\ud800"}'}, "input[0].arguments",
         InvalidRequest),
        ({"type": "function_call_output", "call_id": "nope", "output": "x"}, "input[0].call_id", InvalidRequest),
        ({"type": "function_call_output", "call_id": "call_1"}, "input[0].output", InvalidRequest),
    ],
)
def test_what_cannot_be_converted_is_a_400_naming_the_item_field(raw: dict[str, Any], param: str,
                                                                 error: type[InvalidRequest]) -> None:
    earlier = [] if raw.get("call_id") != "call_1" else assistant_turn(OUTPUT)
    with pytest.raises(error) as exc:
        input_messages(items(raw), earlier)
    assert exc.value.param == param


def test_a_system_message_after_the_start_is_refused_whatever_came_before() -> None:
    for earlier, raw in [
        ([], [{"role": "developer", "content": "a"}, {"role": "system", "content": "b"}]),  # fine: at the start
        ([{"role": "system", "content": "s"}], [{"role": "developer", "content": "a"}]),  # fine: still the start
    ]:
        assert input_messages(items(*raw), earlier)
    for earlier, raw in [
        ([{"role": "user", "content": "u"}], [{"role": "developer", "content": "a"}]),
        ([], [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
              {"role": "system", "content": "late"}]),
        ([], [{"role": "user", "content": "u"}, {"role": "system", "content": "late"}]),
    ]:
        with pytest.raises(InvalidRequest) as exc:
            input_messages(items(*raw), earlier)
        assert exc.value.param == f"input[{len(raw) - 1}].role"


def test_many_system_messages_convert_in_linear_time() -> None:
    """100,000 leading system messages (a hostile body well under the size limit) convert at once
    (a scan of all earlier messages at each one took minutes)."""
    many = items(*[{"role": "system", "content": "x"}] * 100_000, {"role": "user", "content": "hi"})
    assert len(input_messages(many, earlier=[])) == 100_001
