"""Prompt tokens a phone did not process again, seen from outside (docs/state-reuse.md): OpenAI's
``usage.prompt_tokens_details.cached_tokens`` on every path (completions and chat, streamed or not,
``n`` > 1), the access line's ``reused`` and the ``qhx:prefix_cache_queries`` / ``_hits`` counters
of /metrics, all telling the same number; through the official openai client against the live
server (simulated phone behind a real adb server)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from server.logs import make_handler
from tests.api.live_server import LiveServer
from tests.api.test_logging import JsonLines
from tests.api.test_metrics import delta, labels, scrape

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a phone maker."}]


@pytest.fixture
def json_logs() -> Iterator[JsonLines]:
    logs = JsonLines()
    handler = make_handler("json", logs.stream)
    access = logging.getLogger("server.api.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        yield logs
    finally:
        access.removeHandler(handler)
        access.setLevel(level)


def run(live: LiveServer, endpoint: str, *, stream: bool, n: int = 1, rid: str) -> Any:
    """One request through the openai client; its usage (the usage chunk when streamed)."""
    client = live.client()
    common: dict[str, Any] = {"model": live.model, "max_tokens": 4, "temperature": 0.0, "n": n,
                              "extra_headers": {"X-Request-ID": rid}}
    if stream:
        common |= {"stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        out = client.chat.completions.create(messages=MESSAGES, **common)  # type: ignore[call-overload]
    else:
        out = client.completions.create(prompt="Phones are", **common)  # type: ignore[call-overload]
    if not stream:
        return out.usage
    usages = [chunk.usage for chunk in out if chunk.usage is not None]
    assert len(usages) == 1
    return usages[0]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("n", [1, 2])
def test_cached_tokens_in_usage_agree_with_the_access_line_and_the_prefix_cache_counters(
    live: LiveServer, json_logs: JsonLines, endpoint: str, stream: bool, n: int,
) -> None:
    lab = labels(live)
    before = scrape(live.base_url)
    rid = f"trace-cached-{endpoint}-{stream}-{n}"
    usage = run(live, endpoint, stream=stream, n=n, rid=rid)
    d = delta(before, scrape(live.base_url))
    details = usage.prompt_tokens_details
    assert details is not None and isinstance(details.cached_tokens, int)
    assert 0 <= details.cached_tokens <= usage.prompt_tokens
    # every choice is a phone request of its own and queries the whole prompt
    assert d("qhx:prefix_cache_queries_total", **lab) == n * usage.prompt_tokens
    hits = d("qhx:prefix_cache_hits_total", **lab)
    assert details.cached_tokens * n <= hits <= usage.prompt_tokens * n  # usage: the fewest over choices
    if n == 1:
        assert hits == details.cached_tokens
    line = json_logs.access(rid)
    assert line["reused"] == details.cached_tokens and line["prompt_tokens"] == usage.prompt_tokens
    assert f"reused={details.cached_tokens} " in line["msg"]


def test_prompt_tokens_details_is_on_the_wire_as_openai_sends_it(live: LiveServer) -> None:
    raw = live.client().chat.completions.with_raw_response.create(model=live.model, messages=MESSAGES,  # type: ignore[arg-type]
                                                                  max_tokens=2)
    body = raw.http_response.json()
    assert list(body["usage"]) == ["completion_tokens", "prompt_tokens", "total_tokens", "prompt_tokens_details"]
    assert list(body["usage"]["prompt_tokens_details"]) == ["cached_tokens"]
