"""ChatService (server/serving/chat/service.py) driven directly: rendering, the budget and context
checks in chat's words, the reply split into reasoning, content and tool calls, the body and the
chunks. On the in-process phone double (tests/serving/served_model.py); tests/api/test_chat*.py check
the same end to end over HTTP."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from server.errors import ContextLengthExceeded
from server.serving.chat.protocol import ChatCompletionRequest
from server.serving.chat.service import ChatService, PreparedChat
from server.serving.models import ModelRegistry
from server.serving.tokens import ENDOFTEXT, IM_END, HostTokenizer
from tests.serving.inprocess_phone_double import InProcessPhoneDouble
from tests.serving.served_model import MODEL, ServedModel

USER = {"role": "user", "content": "What is the weather in Paris?"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"


@pytest.fixture
def service(served: ServedModel, registry: ModelRegistry) -> ChatService:
    return ChatService(served, registry)


def request(**body: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": [USER], **body})


async def prepare(service: ChatService, **body: Any) -> PreparedChat:
    return await service.prepare(request(**body))


async def complete(service: ChatService, **body: Any) -> dict[str, Any]:
    body_json = await service.complete(await prepare(service, **body))
    return json.loads(body_json)  # type: ignore[no-any-return]


async def stream(service: ChatService, **body: Any) -> list[dict[str, Any]]:
    prepared = await prepare(service, stream=True, **body)
    return [json.loads(chunk) async for chunk in service.stream(prepared)]


def says(served: ServedModel, tok: HostTokenizer, text: str) -> None:
    """Give the served model a phone that says ``text`` and ends its turn (``<|im_end|>``)."""
    served.reset(InProcessPhoneDouble([*tok.encode(text), tok.special_id(IM_END)]), max_context=served.max_context)


async def test_render_gives_the_template_text_its_ids_and_whether_it_thinks(
    service: ChatService, qwen_tokenizer: HostTokenizer,
) -> None:
    rendered = await service.render(request())
    assert rendered.text == f"<|im_start|>user\n{USER['content']}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert rendered.ids == qwen_tokenizer.encode(rendered.text) and rendered.thinking is False
    assert rendered.info.name == MODEL and rendered.template_source
    thinking = await service.render(request(chat_template_kwargs={"enable_thinking": True}))
    assert thinking.thinking is True and thinking.text.endswith("<|im_start|>assistant\n<think>\n")
    forced = await service.render(request(tools=[WEATHER], tool_choice="required", enable_thinking=True))
    assert forced.thinking is False and forced.text.endswith("</think>\n\n<tool_call>\n<function=")
    bare = await service.render(request(), add_generation_prompt=False)
    assert not bare.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


async def test_the_phone_request_carries_the_id_the_prompt_and_both_stop_ids(
    service: ChatService, qwen_tokenizer: HostTokenizer,
) -> None:
    prepared = await prepare(service, max_tokens=9)
    params = prepared.params
    assert prepared.id.startswith("chatcmpl-") and params.request_id == prepared.id
    assert params.prompt_ids == prepared.prompt.ids and params.max_new == 9
    assert params.stop_ids == [qwen_tokenizer.special_id(IM_END), qwen_tokenizer.special_id(ENDOFTEXT)]


async def test_max_completion_tokens_wins_over_max_tokens_and_no_budget_is_what_fits(
    service: ChatService, served: ServedModel,
) -> None:
    assert (await prepare(service, max_tokens=9, max_completion_tokens=5)).params.max_new == 5
    prepared = await prepare(service)
    assert prepared.params.max_new == served.max_context - len(prepared.prompt.ids)


async def test_context_errors_are_in_openais_words_for_chat(service: ChatService, served: ServedModel) -> None:
    n = len((await service.render(request())).ids)
    served.reset(max_context=n + 4)
    cases = [
        ({"max_completion_tokens": 5}, "max_completion_tokens",
         (f"you requested {n + 5} tokens ({n} in the messages, 5 in the completion). Please reduce the length "
          "of the messages or completion.")),
        ({"max_tokens": 6}, "max_tokens",
         (f"you requested {n + 6} tokens ({n} in the messages, 6 in the completion). Please reduce the length "
          "of the messages or completion.")),
    ]
    for body, param, said in cases:
        with pytest.raises(ContextLengthExceeded) as caught:
            await prepare(service, **body)
        assert caught.value.message == f"This model's maximum context length is {n + 4} tokens. However, {said}"
        assert caught.value.param == param
    served.reset(max_context=n)
    with pytest.raises(ContextLengthExceeded) as caught:
        await prepare(service, max_tokens=1)
    assert caught.value.message == (f"This model's maximum context length is {n} tokens. However, your messages "
                                    f"resulted in {n} tokens, which leaves no room for the reply. Please reduce "
                                    "the length of the messages.")
    assert caught.value.param == "messages"


async def test_a_conversation_too_large_to_tokenize_is_refused_from_its_size(
    service: ChatService, served: ServedModel, qwen_tokenizer: HostTokenizer,
) -> None:
    served.reset(max_context=16)
    huge = request(messages=[{"role": "user", "content": "x" * 100_000}])
    with pytest.raises(ContextLengthExceeded) as caught:
        await service.render(huge)
    size = len((await service.render(request())).text) - len(USER["content"])  # the template's own bytes
    at_least = qwen_tokenizer.min_tokens("x" * (100_000 + size))
    assert caught.value.message == (
        f"This model's maximum context length is 16 tokens. However, your messages resulted in a prompt of "
        f"{100_000 + size} bytes, which is at least {at_least} tokens (a bound computed without tokenizing it). "
        "Please reduce the length of the messages."
    )
    assert caught.value.param == "messages"


async def test_the_reply_is_the_message_and_usage_counts_the_prompt_once(
    service: ChatService, served: ServedModel, qwen_tokenizer: HostTokenizer,
) -> None:
    says(served, qwen_tokenizer, "It is sunny.")
    body = await complete(service, n=2, temperature=0.0)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    assert body["choices"] == [
        {"finish_reason": "stop", "index": i, "logprobs": None,
         "message": {"content": "It is sunny.", "refusal": None, "role": "assistant"}}
        for i in (0, 1)
    ]
    n_prompt, n_reply = len((await service.render(request())).ids), len(qwen_tokenizer.encode("It is sunny."))
    assert body["usage"] == {"completion_tokens": 2 * n_reply, "prompt_tokens": n_prompt,
                             "total_tokens": n_prompt + 2 * n_reply, "prompt_tokens_details": {"cached_tokens": 0}}


async def test_thinking_goes_to_reasoning_content(
    service: ChatService, served: ServedModel, qwen_tokenizer: HostTokenizer,
) -> None:
    says(served, qwen_tokenizer, "The user asks about weather.\n</think>\n\nIt is sunny.")
    message = (await complete(service, enable_thinking=True))["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("The user asks about weather.", "It is sunny.")
    chunks = await stream(service, enable_thinking=True)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user asks about weather."
    assert "".join(d.get("content", "") for d in deltas) == "It is sunny."


async def test_a_complete_tool_call_is_a_tool_call_and_finishes_with_tool_calls(
    service: ChatService, served: ServedModel, qwen_tokenizer: HostTokenizer,
) -> None:
    says(served, qwen_tokenizer, CALL)
    choice = (await complete(service, tools=[WEATHER]))["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"] == {"arguments": '{"city": "Paris"}', "name": "get_weather"}
    chunks = await stream(service, tools=[WEATHER])
    calls = [t for c in chunks for t in c["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"]
    assert "".join(t["function"].get("arguments", "") for t in calls) == '{"city": "Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_the_stream_is_the_role_then_deltas_then_an_empty_finish_delta(
    service: ChatService, served: ServedModel, qwen_tokenizer: HostTokenizer,
) -> None:
    says(served, qwen_tokenizer, "It is sunny in Paris today.")
    chunks = await stream(service)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    first, *middle, last = [c["choices"][0] for c in chunks]
    assert first == {"delta": {"role": "assistant", "content": ""}, "finish_reason": None, "index": 0,
                     "logprobs": None}
    assert all(m["finish_reason"] is None and set(m["delta"]) == {"content"} for m in middle)
    assert "".join(m["delta"]["content"] for m in middle) == "It is sunny in Paris today."
    assert last == {"delta": {}, "finish_reason": "stop", "index": 0, "logprobs": None}


async def test_unknown_fields_are_logged_on_the_chat_logger(
    service: ChatService, caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="server.serving.chat.service"):
        prepared = await prepare(service, qhx_not_a_field=1)
    said = f"request {prepared.id}: ignoring unknown fields ['qhx_not_a_field']"
    assert said in [r.getMessage() for r in caplog.records if r.name == "server.serving.chat.service"]
