"""Failures: the phone dies mid-stream, the queue is full, no phone at all."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import LiveServer, ServerThread


def test_phone_crash_mid_stream_ends_with_an_error_event(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(crash_after=3)
    body = {"model": live.model, "prompt": "Go on", "max_tokens": 50, "stream": True}
    with httpx.stream("POST", live.base_url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] != "data: [DONE]"
    err = json.loads(lines[-1][6:])["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    assert any(json.loads(line[6:]).get("choices") for line in lines[:-1])  # text came first
    # the openai client raises it
    with pytest.raises(openai.APIError):
        for _ in live.client().completions.create(model=live.model, prompt="Go on", max_tokens=50, stream=True):
            pass
    live.phone.configure(crash_after=None)
    live.wait_idle(timeout=15)  # the session restarts


def test_phone_crash_without_streaming_is_a_5xx_envelope(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(crash_after=3)
    r = httpx.post(live.base_url + "/v1/completions", json={"model": live.model, "prompt": "Go", "max_tokens": 20},
                   timeout=30)
    assert r.status_code >= 500 and r.status_code != 500
    assert r.json()["error"]["code"] in {"phone_lost", "phone_error", "protocol_violation"}
    live.phone.configure(crash_after=None)
    live.wait_idle(timeout=15)


async def test_full_queue_is_429_before_the_stream_starts(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(speed=1)  # max_queue is 1: one request runs, one waits, the third is refused
    async with live.async_client() as client:

        async def hold() -> None:
            stream = await client.completions.create(model=live.model, prompt="Go on", max_tokens=40, stream=True)
            async for _ in stream:
                pass

        running = asyncio.ensure_future(hold())
        await asyncio.sleep(0.3)
        waiting = asyncio.ensure_future(hold())
        await asyncio.sleep(0.3)
        with pytest.raises(openai.RateLimitError) as e:
            await client.completions.create(model=live.model, prompt="Go on", max_tokens=5, stream=True)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.code == "queue_full"
        for task in (running, waiting):
            task.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
    await asyncio.to_thread(live.wait_idle, 2.0)


@pytest.fixture(scope="module")
def no_phone() -> Iterator[str]:
    """A server whose adb server has no phone at all."""
    with SimLab(phones=0) as lab, ServerThread(create_app(Settings(adb_servers=[lab.adb_server], sim=0))) as st:
        yield f"http://127.0.0.1:{st.port}"


def test_without_phones_health_is_ok_but_not_ready(no_phone: str) -> None:
    assert httpx.get(no_phone + "/health").json() == {"status": "ok"}
    r = httpx.get(no_phone + "/ready")
    assert r.status_code == 503 and r.json()["phones"] == []
    assert httpx.get(no_phone + "/v1/models").json() == {"object": "list", "data": []}
    r = httpx.post(no_phone + "/v1/completions", json={"model": "qwen3.5-0.8b", "prompt": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


SURROGATE = '"a\\ud800b"'  # JSON text: an escaped lone surrogate (what JSON.stringify sends for a split emoji)
_CHAT = '"messages": [{"role": "user", "content": "hi"}]'
_SURROGATE_BODIES = [
    ("/v1/completions", f'"prompt": {SURROGATE}', "prompt"),
    ("/v1/completions", f'"prompt": [{SURROGATE}], "echo": true', "prompt[0]"),
    ("/v1/completions", f'"prompt": "hi", "stop": [{SURROGATE}]', "stop[0]"),
    ("/v1/chat/completions", f'"messages": [{{"role": "user", "content": {SURROGATE}}}]', "messages[0].content"),
    ("/v1/chat/completions", f'"messages": [{{"role": "user", "content": [{{"type": "text", "text": {SURROGATE}}}]}}]',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", (f'"messages": [{{"role": "user", "content": "hi"}}, {{"role": "assistant", "refusal": '
                              f'{SURROGATE}}}, {{"role": "user", "content": "hi"}}]'), "messages[1].refusal"),
    ("/v1/chat/completions", (f'{_CHAT}, "tools": [{{"type": "function", "function": {{"name": "f", "description": '
                              f'{SURROGATE}}}}}]'), "tools[0].function.description"),
    ("/v1/chat/completions", f'{_CHAT}, "chat_template_kwargs": {{"x": {SURROGATE}}}', "chat_template_kwargs.x"),
    ("/v1/chat/completions", f'{_CHAT}, "user": {SURROGATE}', "user"),
    ("/v1/chat/completions", f'{_CHAT}, "some_unknown_field": {SURROGATE}', "some_unknown_field"),
    ("/tokenize", f'"prompt": {SURROGATE}', "prompt"),
    ("/tokenize", f'"messages": [{{"role": "user", "content": {SURROGATE}}}]', "messages[0].content"),
    ("/apply-template", f'"messages": [{{"role": "user", "content": {SURROGATE}}}]', "messages[0].content"),
]


@pytest.mark.parametrize(("path", "fields", "param"), _SURROGATE_BODIES)
@pytest.mark.parametrize("stream", [False, True])
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(live: LiveServer, path: str, fields: str, param: str,
                                                             stream: bool) -> None:
    """JSON may escape half a surrogate pair; it is no character, and was a 500 wherever the text was
    tokenized, echoed or put in an error message (prompt, messages, tools, the model name...)."""
    if stream and not path.startswith("/v1/"):
        pytest.skip("no stream on the debug endpoints")
    model = f'"{live.model}"'
    streamed = ', "stream": true' if stream else ""
    text = f'{{"model": {model}, "max_tokens": 3, {fields}{streamed}}}'
    r = httpx.post(live.base_url + path, content=text.encode(), headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "invalid_request_error",
                                 "param": param, "code": "invalid_value"}
    # the model name too, on every endpoint
    text = text.replace(model, SURROGATE, 1)
    r = httpx.post(live.base_url + path, content=text.encode(), headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] in {"model", param}, r.text
