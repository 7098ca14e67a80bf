"""Chat request validation and the conversion of OpenAI messages into the template's form."""

from __future__ import annotations

from typing import Any

import pytest

from server.errors import InvalidRequest, UnsupportedParameter
from server.serving.chat.protocol import (
    AssistantMessage,
    ChatCompletionRequest,
    Delta,
    DeltaFunction,
    DeltaToolCall,
    ToolCallFunction,
    ToolCallOut,
)

USER = {"role": "user", "content": "hi"}


def request(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [USER], **kw})


def test_template_messages_convert_roles_parts_arguments_and_reasoning() -> None:
    r = request(messages=[
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
        {"role": "assistant", "content": None, "reasoning": "thought",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"n": 1}'}},
                        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": ""}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
    ])
    assert r.template_messages() == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "reasoning_content": "thought", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"n": 1}}},
            {"id": "c2", "type": "function", "function": {"name": "g", "arguments": {}}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"},
    ]


@pytest.mark.parametrize("arguments", [
    "[1, 2]", "{bad", '"text"',
    '{"a": "\\ud800"}',  # decodes to a lone surrogate: no text the tokenizer can take (was a 500)
    '{"a": ' + "[" * 5000 + "]" * 5000 + "}",  # past the recursion limit (was a 500)
])
def test_tool_call_arguments_must_be_a_json_object(arguments: str) -> None:
    r = request(messages=[USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}])
    with pytest.raises(InvalidRequest) as caught:
        r.template_messages()
    assert caught.value.param == "messages[1].tool_calls[0].function.arguments"


@pytest.mark.parametrize(
    ("message", "param", "error"),
    [
        ({"role": "user", "content": [{"type": "text"}]}, "messages[1].content[0].text", InvalidRequest),
        ({"role": "user", "content": [{"type": "text", "text": None}]}, "messages[1].content[0].text",
         InvalidRequest),
        ({"role": "assistant", "content": [{"type": "refusal"}]}, "messages[1].content[0].refusal", InvalidRequest),
        ({"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}, "messages[1].content[0].type",
         InvalidRequest),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
         "messages[1].content[0].type", UnsupportedParameter),
    ],
)
def test_bad_content_parts_name_what_is_wrong(message: dict[str, Any], param: str, error: type[Exception]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        request(messages=[USER, message]).template_messages()
    assert type(caught.value) is error and caught.value.param == param
    field = param.rsplit(".", 1)[1]
    if field != "type":  # the part's type is fine: the message names the missing field
        assert f"'{field}'" in caught.value.message and caught.value.code == "missing_required_parameter"
        assert "not supported" not in caught.value.message


def test_assistant_refusals_are_rendered_as_its_text() -> None:
    r = request(messages=[USER, {"role": "assistant", "content": [
        {"type": "text", "text": "Well. "}, {"type": "refusal", "refusal": "I can't help with that."}]},
        {"role": "assistant", "content": None, "refusal": "No."},
        {"role": "assistant", "content": "Hm.", "refusal": " No."}, USER])
    assert r.template_messages()[1:4] == [
        {"role": "assistant", "content": [{"type": "text", "text": "Well. "},
                                          {"type": "text", "text": "I can't help with that."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hm."}, {"type": "text", "text": " No."}]},
    ]


def test_thinking_switches() -> None:
    assert request().thinking is False
    assert request(enable_thinking=True).thinking is True
    assert request(chat_template_kwargs={"enable_thinking": True}).thinking is True
    # chat_template_kwargs wins over the shorthand
    assert request(enable_thinking=True, chat_template_kwargs={"enable_thinking": False}).thinking is False


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert request(max_tokens=5, max_completion_tokens=7).max_new_requested == (7, "max_completion_tokens")
    assert request(max_tokens=5).max_new_requested == (5, "max_tokens")
    assert request().max_new_requested == (None, "max_tokens")


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "x"}}, "audio"),
    ],
)
def test_check_supported_names_the_field(kw: dict[str, Any], param: str) -> None:
    with pytest.raises((UnsupportedParameter, InvalidRequest)) as caught:
        request(**kw).check_supported()
    assert caught.value.param == param  # type: ignore[union-attr]


def test_defaults_are_accepted() -> None:
    request(n=1, logprobs=False, top_logprobs=0, presence_penalty=0, response_format={"type": "text"},
            modalities=["text"], user="u", parallel_tool_calls=False).check_supported()


def test_tools_are_rendered_as_sent() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"b": None, "a": 1}}}
    assert request(tools=[tool]).template_tools() == [tool]


def test_deltas_and_messages_serialize_like_openai() -> None:
    assert Delta(role="assistant", content="").model_dump_json() == '{"role":"assistant","content":""}'
    assert Delta().model_dump_json() == "{}"
    start = Delta(tool_calls=[DeltaToolCall(index=0, id="call_1", type="function",
                                            function=DeltaFunction(name="f", arguments=""))])
    assert start.model_dump() == {"tool_calls": [
        {"index": 0, "id": "call_1", "function": {"arguments": "", "name": "f"}, "type": "function"}]}
    message = AssistantMessage(content=None, tool_calls=[
        ToolCallOut(id="call_1", function=ToolCallFunction(arguments="{}", name="f"))])
    assert message.model_dump() == {"content": None, "refusal": None, "role": "assistant", "tool_calls": [
        {"id": "call_1", "function": {"arguments": "{}", "name": "f"}, "type": "function"}]}
    assert AssistantMessage(content="x", reasoning_content="r").model_dump() == {
        "content": "x", "refusal": None, "role": "assistant", "reasoning_content": "r"}
