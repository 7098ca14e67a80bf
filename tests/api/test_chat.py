"""/v1/chat/completions through the official openai client, end to end on simulated phones.

The simulated phone reads the chat structure of its context: a prompt ending ``<think>\\n`` gets a
reasoning block first; a ``<tools>`` block in the system turn gets a call of the first tool, unless
the last user turn is a tool response (see server/sim/generation.py).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from server.serving.chat.protocol import ChatCompletionRequest
from server.serving.chat.template import ChatTemplate
from server.serving.tokens import HostTokenizer
from tests.api.live_server import LiveServer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
    "zone": {"type": "string"}}, "required": ["zone"]}}}

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
USER = {"role": "user", "content": "What is the capital of France?"}
THINK = {"chat_template_kwargs": {"enable_thinking": True}}


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    return ChatTemplate.for_bundle(None)


def render(template: ChatTemplate, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
           thinking: bool = False) -> str:
    """The prompt as the template renders it (messages in the template's form: arguments as objects)."""
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": messages})
    return template.render(request.template_messages(), tools, enable_thinking=thinking)


def prompt_tokens(tokenizer: HostTokenizer, template: ChatTemplate, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None = None, thinking: bool = False) -> int:
    return len(tokenizer.encode(render(template, messages, tools, thinking)))


def test_chat_completion_has_openai_shape_and_exact_usage(
    live: LiveServer, tokenizer: HostTokenizer, template: ChatTemplate
) -> None:
    raw = live.client().chat.completions.with_raw_response.create(
        model=live.model, messages=[SYSTEM, USER], max_completion_tokens=20
    )
    r = raw.parse()
    assert raw.headers["x-request-id"].startswith("req-")
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == live.model
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].logprobs is None
    choice = r.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.message.tool_calls is None
    assert r.usage is not None
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer, template, [SYSTEM, USER])
    assert r.usage.completion_tokens == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20
    body = httpx.post(live.base_url + "/v1/chat/completions",
                      json={"model": live.model, "messages": [USER], "max_tokens": 5}).json()
    assert list(body) == ["id", "choices", "created", "model", "object", "usage"]
    assert list(body["choices"][0]) == ["finish_reason", "index", "logprobs", "message"]
    assert list(body["choices"][0]["message"]) == ["content", "refusal", "role"]  # no empty extras
    assert body["usage"]["completion_tokens"] == 5


def test_thinking_is_off_by_default(live: LiveServer) -> None:
    r = live.client().chat.completions.create(model=live.model, messages=[USER], max_completion_tokens=40,
                                              temperature=0)
    message = r.choices[0].message
    assert "reasoning_content" not in (message.model_extra or {})
    assert message.content and "<think>" not in message.content and "</think>" not in message.content


@pytest.mark.parametrize("switch", [THINK, {"enable_thinking": True}], ids=["chat_template_kwargs", "top_level"])
def test_thinking_on_splits_reasoning_from_content(
    live: LiveServer, tokenizer: HostTokenizer, template: ChatTemplate, switch: dict[str, Any]
) -> None:
    r = live.client().chat.completions.create(model=live.model, messages=[USER], max_completion_tokens=200,
                                              temperature=0, extra_body=switch)
    message = r.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert reasoning
    assert "<think>" not in reasoning and "</think>" not in reasoning and not reasoning.startswith("\n")
    assert message.content and "</think>" not in message.content and not message.content.startswith("\n")
    assert r.usage is not None
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer, template, [USER], thinking=True)


async def test_stream_has_openai_chunk_sequence_and_matches_non_streaming(live: LiveServer) -> None:
    kw: dict[str, Any] = {"model": live.model, "messages": [SYSTEM, USER], "max_completion_tokens": 120,
                          "temperature": 0, "extra_body": THINK}
    async with live.async_client() as client:
        whole = await client.chat.completions.create(**kw)
        stream = await client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
    first, *deltas, final, usage = chunks
    assert {c.id for c in chunks} == {first.id} and {c.created for c in chunks} == {first.created}
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.usage is None and c.choices[0].finish_reason is None for c in [first, *deltas])
    assert final.choices[0].finish_reason == "length"
    assert final.choices[0].delta.content is None and final.choices[0].delta.role is None
    assert usage.choices == [] and usage.usage == whole.usage
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in deltas)
    content = "".join(c.choices[0].delta.content or "" for c in deltas)
    assert reasoning == (whole.choices[0].message.model_extra or {})["reasoning_content"]
    assert content == whole.choices[0].message.content
    # reasoning deltas all come before content deltas
    kinds = ["c" if c.choices[0].delta.content else "r" for c in deltas]
    assert kinds == sorted(kinds, reverse=True)


def test_stream_without_include_usage_has_no_usage_field(live: LiveServer) -> None:
    with httpx.stream("POST", live.base_url + "/v1/chat/completions", json={
        "model": live.model, "messages": [USER], "max_tokens": 3, "stream": True,
    }) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


def test_multi_turn_with_reasoning_echoed_back(
    live: LiveServer, tokenizer: HostTokenizer, template: ChatTemplate
) -> None:
    client = live.client()
    history: list[dict[str, Any]] = [SYSTEM, USER]
    r1 = client.chat.completions.create(model=live.model, messages=history, max_completion_tokens=150,
                                        temperature=0, extra_body=THINK)
    assistant = r1.choices[0].message.model_dump(exclude_none=True)  # keeps reasoning_content, as clients do
    assert assistant.get("reasoning_content")
    history += [assistant, {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]}]
    r2 = client.chat.completions.create(model=live.model, messages=history, max_completion_tokens=10,
                                        extra_body=THINK)
    assert r2.usage is not None
    # earlier reasoning is dropped by the template (before the last user query): exact prompt size
    assert r2.usage.prompt_tokens == prompt_tokens(tokenizer, template, history, thinking=True)
    rendered = render(template, history, thinking=True)
    assert assistant["reasoning_content"] not in rendered and str(assistant["content"]).strip() in rendered


def test_tool_round_trip(live: LiveServer, tokenizer: HostTokenizer, template: ChatTemplate,
                         phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    client = live.client()
    messages: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": "Weather in Paris for 3 days?"}]
    r = client.chat.completions.create(model=live.model, messages=messages, tools=[WEATHER, TIME],
                                       max_completion_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert args["city"] == "Paris" and isinstance(args["days"], int)  # typed by the schema
    assert r.usage is not None
    assert r.usage.prompt_tokens == prompt_tokens(tokenizer, template, messages, [WEATHER, TIME])

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})}]
    answer = client.chat.completions.create(model=live.model, messages=messages, tools=[WEATHER, TIME],
                                            max_completion_tokens=200)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and answer.choices[0].message.tool_calls is None
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == prompt_tokens(tokenizer, template, messages, [WEATHER, TIME])
    rendered = render(template, messages, [WEATHER, TIME])
    assert "<tool_response>\n{\"temp_c\": 21}\n</tool_response>" in rendered
    assert f"<parameter=days>\n{args['days']}\n</parameter>" in rendered


def test_streamed_tool_call_deltas_are_reassembled_by_the_client(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    kw: dict[str, Any] = {"model": live.model, "tools": [WEATHER], "max_completion_tokens": 100,
                          "messages": [{"role": "user", "content": "Weather in Paris?"}], "temperature": 0}
    client = live.client()
    chunks = list(client.chat.completions.create(**kw, stream=True))
    tool_deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    head, *rest = tool_deltas
    assert head.index == 0 and head.id and head.type == "function"
    assert head.function is not None and head.function.name == "get_weather" and head.function.arguments == ""
    assert rest and all(d.id is None and d.function and d.function.name is None for d in rest)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the SDK's own accumulator (openai.lib.streaming) rebuilds the same call as the non-streamed one
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    whole = client.chat.completions.create(**kw)
    (streamed_call,) = final.choices[0].message.tool_calls or []
    (whole_call,) = whole.choices[0].message.tool_calls or []
    assert streamed_call.function.name == whole_call.function.name == "get_weather"
    assert json.loads(streamed_call.function.arguments) == json.loads(whole_call.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_choice_pre_fills_the_call(live: LiveServer, phone_knobs: Any, choice: Any) -> None:
    phone_knobs(stop_rate=0.3)
    r = live.client().chat.completions.create(
        model=live.model, messages=[USER], tools=[TIME] if choice == "required" else [WEATHER, TIME],
        tool_choice=choice, max_completion_tokens=100,
    )
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"zone": "example"}
    assert r.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_renders_tools_but_parses_no_call(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    r = live.client().chat.completions.create(model=live.model, messages=[USER], tools=[WEATHER],
                                              tool_choice="none", max_completion_tokens=100)
    assert r.choices[0].message.tool_calls is None
    assert "<tool_call>" in (r.choices[0].message.content or "")  # the simulated phone called anyway


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 1.5}, "presence_penalty"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "messages"),
        ({"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
         "messages[1].tool_calls[0].function.arguments"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "word " * 2000}]}, "messages"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_unsupported_or_invalid_requests_are_400_naming_the_field(
    live: LiveServer, extra: dict[str, Any], param: str
) -> None:
    body = {"model": live.model, "messages": [USER], **extra}
    r = httpx.post(live.base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_prompt_over_the_context_is_context_length_exceeded(live: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        live.client().chat.completions.create(model=live.model, messages=[{"role": "user", "content": "x " * 5000}])
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length" in caught.value.message


def test_huge_prompt_refused_without_tokenizing_says_its_count_is_a_bound(
    live: LiveServer, tokenizer: HostTokenizer, template: ChatTemplate
) -> None:
    messages = [{"role": "user", "content": "x " * 300_000}]  # 600 KB: over the bound for 1,024 tokens
    with pytest.raises(openai.BadRequestError) as caught:
        live.client().chat.completions.create(model=live.model, messages=messages)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
    exact = prompt_tokens(tokenizer, template, messages)
    assert f"{exact} tokens" not in caught.value.message  # the bound is not the count...
    assert "at least" in caught.value.message  # ...and says so
    prompt_bytes = len(render(template, messages).encode("utf-8"))
    assert f"{prompt_bytes} bytes" in caught.value.message


def test_assistant_refusal_is_rendered_as_its_text(live: LiveServer) -> None:
    refused = [USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "I won't say."}]},
               {"role": "user", "content": "Please?"}]
    r = httpx.post(live.base_url + "/apply-template", json={"model": live.model, "messages": refused})
    assert r.status_code == 200, r.text
    assert "<|im_start|>assistant\nI won't say.<|im_end|>" in r.json()["prompt"]
    answer = live.client().chat.completions.create(model=live.model, messages=refused,
                                                   max_completion_tokens=2)
    assert answer.choices[0].finish_reason == "length"


def test_default_max_tokens_fill_the_context(live: LiveServer, tokenizer: HostTokenizer,
                                             template: ChatTemplate) -> None:
    r = live.client().chat.completions.create(model=live.model, messages=[USER])
    assert r.usage is not None and r.choices[0].finish_reason == "length"
    context = httpx.get(live.base_url + "/v1/models").json()["data"][0]["max_model_len"]
    assert r.usage.total_tokens == context


def test_response_format_text_user_and_unknown_fields_are_accepted(live: LiveServer) -> None:
    r = live.client().chat.completions.create(
        model=live.model, messages=[{"role": "developer", "content": "Be brief."}, USER], max_completion_tokens=3,
        response_format={"type": "text"}, user="u-1", extra_body={"some_vendor_field": 1, "top_k": 20},
    )
    assert r.choices[0].finish_reason == "length"


def test_unknown_model_is_404(live: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError):
        live.client().chat.completions.create(model="no-such-model", messages=[USER])


def test_stop_string_ends_the_reply(live: LiveServer) -> None:
    whole = live.client().chat.completions.create(model=live.model, messages=[USER], max_completion_tokens=30,
                                                  temperature=0)
    text = whole.choices[0].message.content or ""
    word = text.split()[3]
    r = live.client().chat.completions.create(model=live.model, messages=[USER], max_completion_tokens=30,
                                              temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(word)]


def test_tokenize_and_apply_template_show_the_prompt(
    live: LiveServer, tokenizer: HostTokenizer, template: ChatTemplate
) -> None:
    body = {"model": live.model, "messages": [SYSTEM, USER], "tools": [WEATHER], **THINK}
    tokenized = httpx.post(live.base_url + "/tokenize", json=body).json()
    expected = template.render([SYSTEM, USER], [WEATHER], enable_thinking=True)
    assert tokenized["prompt"] == expected and tokenized["prompt"].endswith("<|im_start|>assistant\n<think>\n")
    assert tokenized["tokens"] == tokenizer.encode(expected) and tokenized["count"] == len(tokenized["tokens"])
    assert tokenized["template_source"] == "builtin:qwen35_0_8b.jinja" and tokenized["max_model_len"] > 0
    raw = httpx.post(live.base_url + "/tokenize", json={"model": live.model, "prompt": "hello world"}).json()
    assert raw["tokens"] == tokenizer.encode("hello world")
    applied = httpx.post(live.base_url + "/apply-template", json={"model": live.model, "messages": [USER]})
    assert applied.json() == {"prompt": template.render([USER])}
    r = live.client().chat.completions.create(model=live.model, messages=[SYSTEM, USER], tools=[WEATHER],
                                              max_completion_tokens=1, extra_body=THINK)
    assert r.usage is not None and r.usage.prompt_tokens == tokenized["count"]


def test_chat_stream_disconnect_frees_the_phone(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(speed=1)  # the real rate: a token every ~44 ms
    body = {"model": live.model, "messages": [USER], "max_tokens": 500, "stream": True, **THINK}
    with httpx.stream("POST", live.base_url + "/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # held: a dropped iterator would close the response at the break
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got == 5:
                break
        assert live.devices()[0]["request_in_flight"] is not None
    live.wait_idle(timeout=1.0)


def test_chat_non_streaming_disconnect_frees_the_phone(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(speed=1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.base_url + "/v1/chat/completions",
                   json={"model": live.model, "messages": [USER], "max_tokens": 500}, timeout=0.5)
    live.wait_idle(timeout=1.0)


def test_unasked_think_block_and_tool_call_are_split_when_streamed(live: LiveServer, phone_knobs: Any) -> None:
    """Thinking off, yet the model opens a think block and then calls a tool: both are split out."""
    phone_knobs(think=True, tool_call=True, stop_rate=0.3)
    try:
        kw: dict[str, Any] = {"model": live.model, "messages": [USER], "tools": [WEATHER],
                              "max_completion_tokens": 200, "temperature": 0}
        whole = live.client().chat.completions.create(**kw)
        chunks = list(live.client().chat.completions.create(**kw, stream=True))
    finally:
        live.phone.configure(think=None, tool_call=None)
    message = whole.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")
    assert reasoning and "<think>" not in reasoning and message.content is None
    assert whole.choices[0].finish_reason == "tool_calls"
    (call,) = message.tool_calls or []
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    kinds = [("r" if (d.model_extra or {}).get("reasoning_content") else "t" if d.tool_calls else "c" if d.content
              else "-") for d in deltas]
    assert kinds[0] == "-" and kinds[-1] == "-"  # the role chunk and the finish chunk
    assert set(kinds[1:-1]) == {"r", "t"} and kinds[1:-1] == sorted(kinds[1:-1])  # reasoning, then the call
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == reasoning
    args = "".join(tc.function.arguments or "" for d in deltas for tc in d.tool_calls or [] if tc.function)
    assert json.loads(args) == json.loads(call.function.arguments)


def test_return_timings_adds_the_phone_timeline(live: LiveServer) -> None:
    body = {"model": live.model, "messages": [USER], "max_tokens": 3, "return_timings": True}
    r = httpx.post(live.base_url + "/v1/chat/completions", json=body).json()
    assert r["timings"]["phone"] == live.phone.serial and "decode_ms" in r["timings"]
