"""ignore_eos and min_tokens through the whole stack (official client, real adb server, simulated
phone): load tests can ask for exact lengths.

The phone here ends every answer at its first sentence end (stop_rate 1): without the extensions a
request stops within a few dozen tokens.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest

from tests.api.live_server import LiveServer

EAGER_TO_STOP = {"stop_rate": 1.0, "min_tokens": 0}


def ask(live: LiveServer, kind: str, stream: bool, **extra: Any) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of one request."""
    client = live.client()
    if kind == "chat":
        args: dict[str, Any] = {"model": live.model, "messages": [{"role": "user", "content": "Tell me a story"}],
                                "extra_body": extra}
        if not stream:
            r = client.chat.completions.create(**args, max_tokens=120)
            assert r.usage is not None
            return r.choices[0].message.content or "", r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(client.chat.completions.create(**args, max_tokens=120, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        usage = chunks[-1].usage
        assert usage is not None
        return text, finish, usage.completion_tokens
    if not stream:
        c = client.completions.create(model=live.model, prompt="Once upon a time", max_tokens=120, extra_body=extra)
        assert c.usage is not None
        return c.choices[0].text, c.choices[0].finish_reason, c.usage.completion_tokens
    parts = list(client.completions.create(model=live.model, prompt="Once upon a time", max_tokens=120, stream=True,
                                           stream_options={"include_usage": True}, extra_body=extra))
    text = "".join(p.choices[0].text for p in parts if p.choices)
    finish = next(p.choices[0].finish_reason for p in parts if p.choices and p.choices[0].finish_reason)
    usage = parts[-1].usage
    assert usage is not None
    return text, finish, usage.completion_tokens


CASES = [("completion", False), ("completion", True), ("chat", False), ("chat", True)]


@pytest.mark.parametrize(("kind", "stream"), CASES)
def test_ignore_eos_gives_exactly_max_tokens(live: LiveServer, phone_knobs: Any, kind: str, stream: bool) -> None:
    phone_knobs(**EAGER_TO_STOP)
    _text, finish, n = ask(live, kind, stream)
    assert finish == "stop" and n < 120  # the phone would stop early
    text, finish, n = ask(live, kind, stream, ignore_eos=True)
    assert finish == "length" and n == 120
    assert "<|im_end|>" not in text and "<|endoftext|>" not in text
    live.wait_idle(timeout=10)


@pytest.mark.parametrize(("kind", "stream"), CASES)
def test_min_tokens_gives_at_least_that_many_then_stops_naturally(
    live: LiveServer, phone_knobs: Any, kind: str, stream: bool,
) -> None:
    phone_knobs(**EAGER_TO_STOP)
    text, finish, n = ask(live, kind, stream, min_tokens=60)
    assert finish == "stop" and 60 <= n < 120, (finish, n)
    assert "<|im_end|>" not in text
    live.wait_idle(timeout=10)  # the phone was cancelled at the host's stop and is free again


def test_min_tokens_equal_to_max_tokens_is_an_exact_length(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(**EAGER_TO_STOP)
    _text, finish, n = ask(live, "completion", False, min_tokens=120)
    assert (finish, n) == ("length", 120)


def test_min_tokens_over_max_tokens_is_a_400_naming_it(live: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        live.client().completions.create(model=live.model, prompt="x", max_tokens=5, extra_body={"min_tokens": 6})
    assert err.value.body["param"] == "min_tokens"  # type: ignore[index]
