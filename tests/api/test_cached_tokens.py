"""Prompt tokens a phone did not process again, seen from outside (docs/state-reuse.md): OpenAI's
``usage.prompt_tokens_details.cached_tokens`` on every path (completions and chat, streamed or not,
``n`` > 1), the access line's ``reused`` and the ``qhx:prefix_cache_queries`` / ``_hits`` counters
of /metrics, all telling the same number; through the official openai client against the live
server (simulated phone behind a real adb server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.api.live_server import LiveServer
from tests.api.test_logging import JsonLines, access_log
from tests.api.test_metrics import delta, labels, scrape

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a phone maker."}]


@pytest.fixture
def json_logs() -> Iterator[JsonLines]:
    with access_log() as logs:
        yield logs


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


def test_the_second_turn_of_a_chat_reuses_the_first_turn_s_prompt(live: LiveServer, json_logs: JsonLines) -> None:
    """End to end with the phones' state reuse: the second turn's prompt starts with everything the
    first turn's prompt held before its generation prompt (the last message boundary), which the phone
    kept; so at least that much is cached, and the log and counters say the same."""
    client, lab = live.client(), labels(live)
    first = [*MESSAGES[:1], {"role": "user", "content": "Which phone makers are in Korea? Answer in detail."}]
    r1 = client.chat.completions.create(model=live.model, messages=first, max_tokens=6, temperature=0.0)  # type: ignore[arg-type]
    kept = httpx.post(live.base_url + "/tokenize", timeout=10, json={
        "model": live.model, "messages": first, "add_generation_prompt": False}).json()["count"]
    second = [*first, {"role": "assistant", "content": r1.choices[0].message.content},
              {"role": "user", "content": "And in Japan?"}]
    before = scrape(live.base_url)
    r2 = client.chat.completions.create(model=live.model, messages=second, max_tokens=6, temperature=0.0,  # type: ignore[arg-type]
                                        extra_headers={"X-Request-ID": "trace-turn-2"})
    d = delta(before, scrape(live.base_url))
    assert r2.usage is not None and r2.usage.prompt_tokens_details is not None
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert kept <= cached < r2.usage.prompt_tokens
    assert json_logs.access("trace-turn-2")["reused"] == cached == d("qhx:prefix_cache_hits_total", **lab)


def test_a_completion_sent_again_reuses_its_prompt(live: LiveServer) -> None:
    client = live.client()
    prompt = "A phone is a small computer that fits in a pocket; it runs apps and makes calls. Tell me"
    first = client.completions.create(model=live.model, prompt=prompt, max_tokens=4, temperature=0.0)
    again = client.completions.create(model=live.model, prompt=prompt, max_tokens=4, temperature=0.0)
    assert first.usage is not None and again.usage is not None and again.usage.prompt_tokens_details is not None
    assert 0 < again.usage.prompt_tokens_details.cached_tokens <= again.usage.prompt_tokens
    assert again.choices[0].text == first.choices[0].text  # reuse does not change the reply


def test_devices_show_what_the_phone_holds_after_a_chat(live: LiveServer) -> None:
    r = live.client().chat.completions.create(model=live.model, messages=MESSAGES, max_tokens=5, temperature=0.0)  # type: ignore[arg-type]
    assert r.usage is not None and r.choices[0].finish_reason == "length"
    live.wait_idle(timeout=5)
    phone = live.devices()[0]
    # the pinned state rule: the prompt, then every generated token (device-protocol.md section 3)
    assert phone["state_tokens"] == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 1 <= phone["checkpoints_used"] <= phone["checkpoint_slots"]  # it kept a boundary of the chat


@pytest.fixture(scope="module", params=["as-generated", "template"])
def v1_phone_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, LiveServer]]:
    """A server over one phone whose runtime has no checkpoint slots (protocol v1), rendering earlier
    replies as the setting says."""
    from server.api.app import create_app
    from server.settings import Settings
    from server.sim.harness import SimLab
    from tests.api.live_server import BASE_KNOBS, ServerThread, wait_ready

    with SimLab(phones=1, speed=0, sim_config=BASE_KNOBS, checkpoints=0) as lab:
        settings = Settings(adb_servers=[lab.adb_server], sim=0, history_render=request.param)
        with ServerThread(create_app(settings)) as st:
            base = f"http://127.0.0.1:{st.port}"
            server = LiveServer(base, wait_ready(base), lab.phones[0], settings)
            yield request.param, server
            if server._client is not None:
                server._client.close()


def test_history_as_generated_lets_a_v1_phone_continue_its_own_reply(
    v1_phone_server: tuple[str, LiveServer],
) -> None:
    """Issue 12, item 6 (adversarial pass: it never hit on simulated phones, whose replies began with
    a space that the template trims). Without checkpoints a phone can only continue its live state: the
    last prompt plus the reply it generated. As generated, the next turn's prompt starts with exactly
    that, so only the new turn is processed; with the model's own template (the think block dropped)
    nothing is reused."""
    render, live = v1_phone_server
    client = live.client()
    messages: list[Any] = [{"role": "system", "content": "You are terse."}]
    cached = []
    for question in ("Name a phone maker.", "And another one?", "Which is older?"):
        messages.append({"role": "user", "content": question})
        r = client.chat.completions.create(model=live.model, messages=messages, max_tokens=12, temperature=0.0)
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
    if render == "as-generated":
        assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    else:
        assert cached == [0, 0, 0], cached
