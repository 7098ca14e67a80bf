"""/v1/chat/completions through LangChain's and LiteLLM's OpenAI-compatible clients (skipped when
they are not installed: they are optional test dependencies)."""

from __future__ import annotations

import os
import warnings
from functools import reduce
from typing import Any

import pytest

from tests.api.live_server import LiveServer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QUESTION = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def chat_openai(live: LiveServer) -> Any:
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(model=live.model, base_url=live.base_url + "/v1", api_key="unused",
                                       max_retries=0, max_tokens=60, temperature=0)


@pytest.fixture(scope="module")
def litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download at import
    with warnings.catch_warnings():  # its import warns (pydantic ReadOnly TypedDicts): not ours to fix
        warnings.simplefilter("ignore")
        module = pytest.importorskip("litellm")
    module.telemetry = False
    return module


def test_langchain_invoke_and_stream(chat_openai: Any, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    reply = chat_openai.invoke([("system", "Be brief."), ("human", QUESTION)])
    assert isinstance(reply.content, str) and reply.content
    assert reply.usage_metadata["output_tokens"] > 0
    streamed = "".join(chunk.content for chunk in chat_openai.stream(QUESTION))
    assert streamed == chat_openai.invoke(QUESTION).content


def test_langchain_tool_calls_invoke_and_stream(chat_openai: Any, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    with_tools = chat_openai.bind_tools([WEATHER])
    reply = with_tools.invoke(QUESTION)
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"} and call["id"].startswith("call_")
    merged = reduce(lambda a, b: a + b, with_tools.stream(QUESTION))
    (streamed,) = merged.tool_calls
    assert (streamed["name"], streamed["args"]) == ("get_weather", {"city": "Paris"})
    # the round trip: LangChain sends the call and the tool result back
    from langchain_core.messages import HumanMessage, ToolMessage

    answer = with_tools.invoke([HumanMessage(QUESTION), reply,
                                ToolMessage('{"temp_c": 21}', tool_call_id=call["id"])])
    assert answer.content and not answer.tool_calls


# LiteLLM imports provider modules lazily, on the first call; one of them warns about its own types
@pytest.mark.filterwarnings("ignore:Item.*ReadOnly.*:UserWarning")
def test_litellm_completion_stream_and_tools(litellm: Any, live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=0.3)
    kw: dict[str, Any] = {"model": f"openai/{live.model}", "api_base": live.base_url + "/v1", "api_key": "unused",
                          "max_tokens": 40, "temperature": 0,
                          "client": live.client()}  # ours, closed at the end (LiteLLM caches its own)
    reply = litellm.completion(messages=[{"role": "user", "content": QUESTION}], **kw)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens > 0
    chunks = list(litellm.completion(messages=[{"role": "user", "content": QUESTION}], stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    called = litellm.completion(messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER], **kw)
    (call,) = called.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and called.choices[0].finish_reason == "tool_calls"
