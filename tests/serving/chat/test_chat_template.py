"""The built-in Qwen3.5-0.8B template against prompts written by hand from the template's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.errors import InvalidRequest
from server.serving.chat.template import (
    BUILTIN_SOURCE,
    RESERVED_TEMPLATE_VARIABLES,
    ChatTemplate,
    TemplateError,
    load_chat_template,
)
from server.serving.tokens import HostTokenizer

OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"
ON = "<|im_start|>assistant\n<think>\n"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

TOOLS_PREAMBLE = (
    "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
    '"required": ["city"]}}}\n</tools>\n\n'
    "If you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: an inner <function=...></function> block must be "
    "nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language BEFORE the function "
    "call, but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>"
)


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate.for_bundle(None)


def test_builtin_is_used_without_a_bundle_template(tmp_path: Path) -> None:
    text, source = load_chat_template(None)
    assert source == BUILTIN_SOURCE and "<tool_call>" in text
    assert load_chat_template(tmp_path)[1] == BUILTIN_SOURCE  # a folder with neither file


def test_bundle_chat_template_jinja_wins(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "from config"}))
    (tmp_path / "chat_template.jinja").write_text("from jinja file")
    assert load_chat_template(tmp_path) == ("from jinja file", str(tmp_path / "chat_template.jinja"))


def test_tokenizer_config_template_string_and_named_list(tmp_path: Path) -> None:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "plain {{ messages[0].content }}"}))
    assert load_chat_template(tmp_path)[0] == "plain {{ messages[0].content }}"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "t"},
                                                    {"name": "default", "template": "d"}]}))
    assert load_chat_template(tmp_path)[0] == "d"
    config.write_text("{not json")
    assert load_chat_template(tmp_path)[1] == BUILTIN_SOURCE


def test_broken_template_syntax_is_a_server_error() -> None:
    with pytest.raises(TemplateError):
        ChatTemplate("{% if %}")


def test_system_and_user_with_thinking_off_by_default(template: ChatTemplate) -> None:
    prompt = template.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" + OFF


def test_thinking_on_opens_the_think_block(template: ChatTemplate) -> None:
    prompt = template.render([{"role": "user", "content": "Hi"}], enable_thinking=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n" + ON


def test_no_generation_prompt(template: ChatTemplate) -> None:
    prompt = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n"


def test_content_is_trimmed_and_text_parts_are_joined(template: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "  sys "}]},
        {"role": "user", "content": [{"type": "text", "text": "\nHello, "}, {"type": "text", "text": "world\n"}]},
    ]
    assert template.render(messages) == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nHello, world<|im_end|>\n" + OFF
    )


def test_multi_turn_drops_reasoning_of_turns_before_the_last_query(template: ChatTemplate) -> None:
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Two plus two."},
        {"role": "user", "content": "And 3+3?"},
    ]
    assert template.render(messages, enable_thinking=True) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n" + ON
    )


def test_think_block_inside_earlier_assistant_content_is_stripped(template: ChatTemplate) -> None:
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
    ]
    assert "<|im_start|>assistant\nA1<|im_end|>\n" in template.render(messages)


def test_tool_round_trip_with_reasoning_after_the_last_query(template: ChatTemplate) -> None:
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "reasoning_content": "\nThe user wants weather.\n",
            "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": {"city": "Nice", "opts": {"a": [1]}}}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]
    expected = (
        TOOLS_PREAMBLE + "\n\nYou are a weather bot.<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThe user wants weather.\n</think>\n\nLet me check."
        "\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
        "\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNice\n</parameter>\n"
        '<parameter=opts>\n{"a": [1]}\n</parameter>\n</function>\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>"
        "\n<tool_response>\nrain\n</tool_response><|im_end|>\n" + OFF
    )
    assert template.render(messages, [WEATHER_TOOL]) == expected


def test_tool_call_without_content_starts_the_turn(template: ChatTemplate) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {}}}]},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "Done."},
    ]
    assert template.render(messages, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n</function>\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nDone.<|im_end|>\n"
    )


def test_tools_without_system_message(template: ChatTemplate) -> None:
    prompt = template.render([{"role": "user", "content": "Hi"}], [WEATHER_TOOL])
    assert prompt == TOOLS_PREAMBLE + "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" + OFF


def test_non_ascii_kept_in_tool_json(template: ChatTemplate) -> None:
    tool = {"type": "function", "function": {"name": "météo", "description": "<b>&'"}}
    prompt = template.render([{"role": "user", "content": "Hi"}], [tool])
    assert '{"type": "function", "function": {"name": "météo", "description": "<b>&\'"}}' in prompt


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "No messages provided"),
        ([{"role": "system", "content": "s"}], "No user query found"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "System message must be"),
        ([{"role": "developer", "content": "a"}, {"role": "user", "content": "b"}], "Unexpected message role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text only"),
    ],
)
def test_malformed_conversations_are_invalid_requests(
    template: ChatTemplate, messages: list[dict], fragment: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        template.render(messages)
    assert fragment in caught.value.message and caught.value.param == "messages"


def test_template_runtime_errors_are_invalid_requests() -> None:
    with pytest.raises(InvalidRequest):
        ChatTemplate("{{ messages[0].content + 1 }}").render([{"role": "user", "content": "x"}])


def test_sandbox_blocks_attribute_escapes() -> None:
    with pytest.raises(InvalidRequest):
        ChatTemplate("{{ messages.__class__.__subclasses__() }}").render([{"role": "user", "content": "x"}])


def test_special_tokens_of_the_prompt_encode_as_single_ids(
    template: ChatTemplate, qwen_tokenizer: HostTokenizer
) -> None:
    ids = qwen_tokenizer.encode(template.render([{"role": "user", "content": "Hi"}]))
    assert ids[0] == 248045  # <|im_start|>
    assert 248046 in ids  # <|im_end|>
    blank = qwen_tokenizer.encode("\n\n")
    assert ids[-4:] == [248068, *blank, 248069, *blank]  # <think> \n\n </think> \n\n


@pytest.mark.parametrize("name", sorted(RESERVED_TEMPLATE_VARIABLES))
def test_template_kwargs_may_not_set_what_the_server_sets(template: ChatTemplate, name: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        template.render([{"role": "user", "content": "Hi"}], template_kwargs={name: "x", "other": 1})
    assert caught.value.param == "chat_template_kwargs" and repr(name) in caught.value.message
    assert "'other'" not in caught.value.message


def test_template_kwargs_are_template_variables_and_enable_thinking_is_the_callers() -> None:
    template = ChatTemplate("{{ greeting }} {{ enable_thinking }} {{ namespace is defined }}")
    assert template.render([], template_kwargs={"greeting": "hi", "enable_thinking": True}) == "hi False True"
    assert template.render([], enable_thinking=True, template_kwargs={"enable_thinking": False}) == " True True"
    # any key, even one that is a parameter name of Jinja's Template.render
    assert ChatTemplate("{{ self is defined }}").render([], template_kwargs={"self": None}) == "True"
