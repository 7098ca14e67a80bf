"""A client that goes away frees its phone at once (pain point 1 of openai-servers.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.api.live_server import LiveServer


def test_stream_disconnect_cancels_on_the_phone(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(speed=1)  # the real rate: ~22.7 tok/s, a token every ~44 ms
    body = {"model": live.model, "prompt": "Go on", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", live.base_url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = 0
        for line in lines:
            got += line.startswith("data: ")
            if got == 5:
                break
        assert live.devices()[0]["request_in_flight"] is not None
        t0 = time.monotonic()
    # closing the response closed the connection
    live.wait_idle(timeout=1.0)
    assert time.monotonic() - t0 < 1.0
    served = live.devices()[0]["tokens_served"]
    time.sleep(0.3)
    assert live.devices()[0]["tokens_served"] == served  # nothing generated for nobody


async def test_disconnect_while_waiting_for_the_first_token(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(slow_first_token_s=3.0)
    async with live.async_client() as client:

        async def consume() -> None:
            stream = await client.completions.create(model=live.model, prompt="Go on", max_tokens=50, stream=True)
            async for _ in stream:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.5)  # the request is on the phone, before any token
        assert live.devices()[0]["request_in_flight"] is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.to_thread(live.wait_idle, 1.0)


def test_non_streaming_disconnect_cancels_too(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(speed=1)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.base_url + "/v1/completions",
                   json={"model": live.model, "prompt": "Go on", "max_tokens": 500}, timeout=0.5)
    live.wait_idle(timeout=1.0)
