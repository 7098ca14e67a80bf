"""Every endpoint that renders the chat template (chat, streamed and not, ``/tokenize``,
``/apply-template``) answers any ``chat_template_kwargs`` and any message content with a 200 or a 400
naming the parameter, never a 500: a name the server passes to the template itself is a 400 naming
``chat_template_kwargs``, any other key is a template variable; a bad content part names what is
wrong with it."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.serving.chat.template import RESERVED_TEMPLATE_VARIABLES, ChatTemplate
from tests.api.live_server import LiveServer

USER = {"role": "user", "content": "What is the capital of France?"}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def post(live: LiveServer, endpoint: str, kwargs: Any, messages: list[Any] | None = None) -> httpx.Response:
    """One request to ``endpoint`` with ``chat_template_kwargs`` set to ``kwargs`` (any JSON)."""
    body: dict[str, Any] = {"model": live.model, "messages": messages or [USER], "tools": [WEATHER],
                            "chat_template_kwargs": kwargs}
    if endpoint.startswith("/v1/chat/completions"):
        body["max_completion_tokens"] = 1
        body["stream"] = endpoint.endswith("stream")
        endpoint = "/v1/chat/completions"
    return httpx.post(live.base_url + endpoint, json=body, timeout=30)


# every endpoint that renders the chat template (chat, streamed and not, and the two debug ones)
ENDPOINTS = ["/v1/chat/completions", "/v1/chat/completions#stream", "/tokenize", "/apply-template"]


def assert_400_naming_kwargs(r: httpx.Response, *names: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "chat_template_kwargs" and error["type"] == "invalid_request_error"
    for name in names:
        assert repr(name) in error["message"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("name", sorted(RESERVED_TEMPLATE_VARIABLES))
def test_reserved_names_are_400_on_every_endpoint(live: LiveServer, endpoint: str, name: str) -> None:
    assert_400_naming_kwargs(post(live, endpoint, {name: True, "fine": 1}), name)


def test_the_reserved_names_include_what_the_server_passes_and_the_template_globals() -> None:
    assert {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "raise_exception",
            "strftime_now", "namespace", "range"} <= RESERVED_TEMPLATE_VARIABLES
    assert "enable_thinking" not in RESERVED_TEMPLATE_VARIABLES  # the one switch clients set


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_several_reserved_names_are_all_named(live: LiveServer, endpoint: str) -> None:
    assert_400_naming_kwargs(post(live, endpoint, {"messages": [], "add_generation_prompt": False}),
                             "messages", "add_generation_prompt")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("kwargs", [[], "x", 1, [{"enable_thinking": True}]])
def test_kwargs_that_are_not_an_object_are_400(live: LiveServer, endpoint: str, kwargs: Any) -> None:
    r = post(live, endpoint, kwargs)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "chat_template_kwargs"


def test_other_keys_are_template_variables(live: LiveServer) -> None:
    template = ChatTemplate("{{ messages[0].content }}|{{ greeting }}|{{ enable_thinking }}")
    assert template.render([USER], template_kwargs={"greeting": "hi"}) == f"{USER['content']}|hi|False"
    r = post(live, "/apply-template", {"enable_thinking": True, "custom_flag": [1, {"a": None}]})
    assert r.status_code == 200, r.text
    assert r.json()["prompt"].endswith("<|im_start|>assistant\n<think>\n")


# JSON values of any shape, keys from the reserved names, the template's own words and anything else
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_keys = st.sampled_from(sorted(RESERVED_TEMPLATE_VARIABLES) + [
    "enable_thinking", "content", "message", "loop", "self", "tool", "query", "index", "__class__", "",
    "tools_block", "add_vision_id", "preserve_thinking", "date_string", "documents",
]) | st.text(max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS), kwargs=st.dictionaries(_keys, _json, max_size=4) | _json)
def test_random_kwargs_are_never_a_500(live: LiveServer, endpoint: str, kwargs: Any) -> None:
    r = post(live, endpoint, kwargs)
    if kwargs is None or (isinstance(kwargs, dict) and not set(kwargs) & RESERVED_TEMPLATE_VARIABLES):
        assert r.status_code == 200, (r.text, json.dumps(kwargs)[:300])
        if endpoint.endswith("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text
    else:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "chat_template_kwargs"


# message content of any shape: strings, parts of any type with or without their fields
_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "refusal", "image_url", "input_audio", "file", "video", "", "Text"])},
    optional={"text": st.none() | st.text() | st.integers(), "refusal": st.none() | st.text(),
              "image_url": st.fixed_dictionaries({"url": st.text()}), "extra": _json},
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
    optional={"content": st.none() | st.text() | st.lists(_part, max_size=3), "refusal": st.none() | st.text(),
              "name": st.text(max_size=5), "reasoning_content": st.text(max_size=10)},
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(endpoint=st.sampled_from(ENDPOINTS), messages=st.lists(_message, min_size=1, max_size=3))
def test_random_message_content_is_never_a_500(live: LiveServer, endpoint: str, messages: list[Any]) -> None:
    r = post(live, endpoint, None, messages=[*messages, USER])
    assert r.status_code in (200, 400), (r.text, json.dumps(messages)[:300])
    if r.status_code == 400:
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and str(error["param"]).startswith("messages"), error
        named = re.fullmatch(r"messages\[(\d+)\]\.content\[(\d+)\]\.(\w+)", error["param"])
        if named:  # a part's error names the field that is wrong: its type only when that is unsupported
            message = messages[int(named[1])]
            part, field = message["content"][int(named[2])], named[3]
            served = part["type"] == "text" or (part["type"] == "refusal" and message["role"] == "assistant")
            if served:  # its own field is missing or not a string
                assert field == part["type"], error
            else:  # its type, or a field that is not even a string
                assert field == "type" or not isinstance(part.get(field), str | None), error
    elif endpoint.endswith("stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text
