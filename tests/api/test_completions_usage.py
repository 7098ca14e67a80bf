"""``usage.completion_tokens`` and ``qhx:generation_tokens_total`` agree with each other and with
the text, on every path: /v1/completions and /v1/chat/completions, streamed or not, n = 1 or more,
with a stop string that matches (docs/api.md, "Usage").

The rule: with a stop string, the tokens up to and including the one in which the stop string
completes; else every generated token. The oracle needs no token ids: the simulated phone is
greedy at temperature 0, so a request cut at ``max_tokens=k`` returns the text of the first ``k``
tokens, and the count for a stop is the smallest ``k`` whose text contains it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.live_server import LiveServer

PROMPT = "The phone said"
MESSAGES = [{"role": "user", "content": "Tell me about phones."}]
MAX = 40


def generated_total(live: LiveServer) -> float:
    """``qhx:generation_tokens_total`` of the model, summed over its phones."""
    text = httpx.get(live.base_url + "/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "qhx:generation_tokens_total" and s.labels.get("model_name") == live.model)


def completion_text(live: LiveServer, **kw: Any) -> str:
    r = live.client().completions.create(model=live.model, prompt=PROMPT, temperature=0, **kw)
    return r.choices[0].text


def chat_text(live: LiveServer, **kw: Any) -> str:
    r = live.client().chat.completions.create(model=live.model, messages=MESSAGES, temperature=0,  # type: ignore[arg-type]
                                              **kw)
    return r.choices[0].message.content or ""


def tokens_to_complete(text_at: Callable[[int], str], stop: str) -> int:
    """Smallest k such that the first k tokens' text contains ``stop`` (bisection over max_tokens)."""
    lo, hi = 1, MAX
    assert stop in text_at(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if stop in text_at(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def run(live: LiveServer, endpoint: str, *, stream: bool, **kw: Any) -> tuple[list[str], int]:
    """(texts of the choices, usage.completion_tokens) through the openai client."""
    client = live.client()
    if endpoint == "completions":
        if not stream:
            r = client.completions.create(model=live.model, prompt=PROMPT, temperature=0, **kw)
            assert r.usage is not None
            return [c.text for c in sorted(r.choices, key=lambda c: c.index)], r.usage.completion_tokens
        chunks = list(client.completions.create(model=live.model, prompt=PROMPT, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, **kw))
        texts: dict[int, str] = {}
        for c in chunks[:-1]:
            texts[c.choices[0].index] = texts.get(c.choices[0].index, "") + c.choices[0].text
        assert chunks[-1].usage is not None
        return [texts[i] for i in sorted(texts)], chunks[-1].usage.completion_tokens
    if not stream:
        rc = client.chat.completions.create(model=live.model, messages=MESSAGES, temperature=0, **kw)  # type: ignore[arg-type]
        assert rc.usage is not None
        return [c.message.content or "" for c in sorted(rc.choices, key=lambda c: c.index)], rc.usage.completion_tokens
    cchunks = list(client.chat.completions.create(model=live.model, messages=MESSAGES, temperature=0,  # type: ignore[arg-type]
                                                  stream=True, stream_options={"include_usage": True}, **kw))
    ctexts: dict[int, str] = {}
    for c in cchunks[:-1]:
        ctexts[c.choices[0].index] = ctexts.get(c.choices[0].index, "") + (c.choices[0].delta.content or "")
    assert cchunks[-1].usage is not None
    return [ctexts[i] for i in sorted(ctexts)], cchunks[-1].usage.completion_tokens


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("where", ["first word", "later word"])
def test_stop_string_usage_is_the_same_streamed_or_not_and_ends_at_the_stop(
    live: LiveServer, endpoint: str, where: str
) -> None:
    def text_at(k: int) -> str:
        return completion_text(live, max_tokens=k) if endpoint == "completions" else chat_text(live, max_tokens=k)

    full = text_at(MAX)
    words = full.split()
    assert len(words) > 6, full
    stop = words[0] if where == "first word" else words[4]
    want_text = full[: full.find(stop)]
    want_tokens = tokens_to_complete(text_at, stop)
    for stream in (False, True):
        for n in (1, 2):  # the live server queues at most one request behind the running one
            before = generated_total(live)
            texts, used = run(live, endpoint, stream=stream, max_tokens=MAX, stop=stop, n=n)
            case = f"{endpoint}, stream={stream}, n={n}, stop={stop!r}"
            assert texts == [want_text] * n, case
            assert used == n * want_tokens, case
            assert generated_total(live) - before == used, case


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_usage_without_a_stop_is_every_token_on_every_path(live: LiveServer, endpoint: str) -> None:
    for stream in (False, True):
        for n in (1, 2):
            before = generated_total(live)
            texts, used = run(live, endpoint, stream=stream, max_tokens=12, n=n)
            assert used == 12 * n and len(texts) == n, (endpoint, stream, n)
            assert generated_total(live) - before == used
