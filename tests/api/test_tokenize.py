"""/tokenize and /apply-template under large inputs: a bounded cost, and the event loop kept free.

Defect (issue 10, #8): /tokenize had no size bound: a 6 MB prompt blocked the event loop ~3 s (/health
waited too) and left the process hundreds of MB larger.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from tests.api.live_server import LiveServer

SIX_MB = ("All work and no play makes Jack a dull boy. " * 140_000)[:6_000_000]


def test_a_six_megabyte_prompt_is_refused_before_it_is_tokenized(live: LiveServer) -> None:
    r = httpx.post(live.base_url + "/tokenize", json={"model": live.model, "prompt": SIX_MB}, timeout=60)
    assert r.status_code == 400, r.text[:200]
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert "6000000 bytes" in err["message"] and "at least" in err["message"]


def test_health_answers_while_a_large_allowed_prompt_is_tokenized(live: LiveServer) -> None:
    """~0.5 MB of digits is under the bound (one token per digit: ~0.6 s of tokenizing). /health, asked
    over and over meanwhile, must never wait for it: its slowest answer stays far below the tokenize
    request's own duration (before the fix it waited for nearly all of it)."""
    prompt = "1234567890" * 50_000
    done: dict[str, Any] = {}

    def tokenize() -> None:
        t0 = time.monotonic()
        done["response"] = httpx.post(live.base_url + "/tokenize", json={"model": live.model, "prompt": prompt},
                                      timeout=120)
        done["seconds"] = time.monotonic() - t0

    big = threading.Thread(target=tokenize)
    big.start()
    health: list[float] = []
    with httpx.Client(base_url=live.base_url, timeout=120) as client:
        while big.is_alive() and len(health) < 10_000:
            t0 = time.monotonic()
            assert client.get("/health").status_code == 200
            health.append(time.monotonic() - t0)
    big.join(120)
    r = done["response"]
    assert r.status_code == 200 and r.json()["count"] == len(prompt)
    assert len(health) >= 2, "the tokenize request ended before /health was asked twice"
    assert max(health) < done["seconds"] / 2, (max(health), done["seconds"])


def _huge_requests(model: str) -> list[tuple[str, str, dict[str, Any]]]:
    user = [{"role": "user", "content": SIX_MB}]
    tool = {"type": "function", "function": {"name": "f", "description": SIX_MB, "parameters": {"type": "object"}}}
    hi = [{"role": "user", "content": "hi"}]
    return [
        ("completion", "/v1/completions", {"model": model, "prompt": SIX_MB}),
        ("completion stream", "/v1/completions", {"model": model, "prompt": SIX_MB, "stream": True}),
        ("completion list", "/v1/completions", {"model": model, "prompt": [SIX_MB]}),
        ("completion ids", "/v1/completions", {"model": model, "prompt": list(range(1, 200_001))}),
        ("chat", "/v1/chat/completions", {"model": model, "messages": user}),
        ("chat stream", "/v1/chat/completions", {"model": model, "messages": user, "stream": True}),
        ("chat tool", "/v1/chat/completions", {"model": model, "messages": hi, "tools": [tool]}),
        ("tokenize prompt", "/tokenize", {"model": model, "prompt": SIX_MB}),
        ("tokenize messages", "/tokenize", {"model": model, "messages": user}),
        ("tokenize tool", "/tokenize", {"model": model, "messages": hi, "tools": [tool]}),
        ("apply-template", "/apply-template", {"model": model, "messages": user}),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _huge_requests("m")])
def test_every_endpoint_that_tokenizes_refuses_a_huge_input_with_a_400(live: LiveServer, case: str) -> None:
    [(_, path, body)] = [c for c in _huge_requests(live.model) if c[0] == case]
    r = httpx.post(live.base_url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "context_length_exceeded"
