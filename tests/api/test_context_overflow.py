"""A chat that outgrows the context, over HTTP with the official openai client (docs/chat.md,
"Context overflow"): a 400 by default; with ``context_overflow: drop-oldest`` (the request's
extension field, or the server's setting) the oldest whole turns are dropped, down to half the
context, and the response says how many messages went in ``X-QHX-Context-Dropped`` (streamed or
not) and on the access line (``dropped=N``). Also ``history_render: as-generated`` as the debug
endpoints show it. The session's live server (defaults) and one started here with both settings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import BASE_KNOBS, LiveServer, ServerThread, wait_ready
from tests.api.test_logging import JsonLines, access_log

HEADER = "x-qhx-context-dropped"
SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def long_chat(turns: int = 14) -> list[dict[str, Any]]:
    """A chat of ~1,500 tokens: over the simulated model's 1,024."""
    messages: list[dict[str, Any]] = [SYSTEM]
    for i in range(turns):
        messages += [{"role": "user", "content": f"Question {i}: " + "tell me more about phones " * 10},
                     {"role": "assistant", "content": f"Answer {i}: " + "phones are small computers " * 10}]
    return [*messages, {"role": "user", "content": "And finally?"}]


@pytest.fixture
def access_lines() -> Iterator[JsonLines]:
    with access_log() as logs:
        yield logs


@pytest.fixture(scope="module")
def dropping() -> Iterator[LiveServer]:
    """A server started with ``--context-overflow drop-oldest --history-render as-generated``."""
    with SimLab(phones=1, speed=0, sim_config=BASE_KNOBS) as lab:
        settings = Settings(adb_servers=[lab.adb_server], sim=0, context_overflow="drop-oldest",
                            history_render="as-generated")
        with ServerThread(create_app(settings)) as st:
            base = f"http://127.0.0.1:{st.port}"
            server = LiveServer(base, wait_ready(base), lab.phones[0], settings)
            yield server
            if server._client is not None:
                server._client.close()


def context_of(server: LiveServer) -> int:
    return int(httpx.get(server.base_url + "/v1/models", timeout=5).json()["data"][0]["context_length"])


def test_by_default_a_chat_over_the_context_is_a_400(live: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        live.client().chat.completions.create(model=live.model, messages=long_chat(), max_tokens=8)  # type: ignore[arg-type]
    assert caught.value.code == "context_length_exceeded"


def tokens_of(server: LiveServer, messages: list[dict[str, Any]]) -> int:
    r = httpx.post(server.base_url + "/tokenize", json={"model": server.model, "messages": messages}, timeout=10)
    return int(r.json()["count"])


def test_drop_oldest_asked_per_request_drops_whole_turns_and_says_how_many(
    live: LiveServer, access_lines: JsonLines,
) -> None:
    messages = long_chat()
    raw = live.client().chat.completions.with_raw_response.create(
        model=live.model, messages=messages, max_tokens=8,  # type: ignore[arg-type]
        extra_body={"context_overflow": "drop-oldest"}, extra_headers={"X-Request-ID": "trace-dropped-1"},
    )
    r = raw.parse()
    dropped = int(raw.headers[HEADER])
    assert dropped > 0 and dropped % 2 == 0  # questions with their answers
    assert r.usage is not None and r.usage.prompt_tokens == tokens_of(live, [SYSTEM, *messages[1 + dropped:]])
    assert r.usage.prompt_tokens + 8 <= context_of(live)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    line = access_lines.access("trace-dropped-1")
    assert line["dropped"] == dropped and f"dropped={dropped}" in line["msg"]


def test_a_stream_says_it_in_its_headers_too(live: LiveServer) -> None:
    messages = long_chat(turns=15)
    with live.client().chat.completions.with_streaming_response.create(
        model=live.model, messages=messages, max_tokens=4, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True}, extra_body={"context_overflow": "drop-oldest"},
    ) as response:
        dropped = int(response.headers[HEADER])
        chunks = list(response.parse())
    usage = chunks[-1].usage
    assert dropped > 0 and usage is not None
    assert usage.prompt_tokens == tokens_of(live, [SYSTEM, *messages[1 + dropped:]])


def test_a_chat_that_fits_drops_nothing_and_has_no_header(live: LiveServer, access_lines: JsonLines) -> None:
    raw = live.client().chat.completions.with_raw_response.create(
        model=live.model, messages=long_chat(turns=2), max_tokens=4,  # type: ignore[arg-type]
        extra_body={"context_overflow": "drop-oldest"}, extra_headers={"X-Request-ID": "trace-dropped-0"},
    )
    assert raw.parse().choices and HEADER not in raw.headers
    assert "dropped" not in access_lines.access("trace-dropped-0")


@pytest.mark.parametrize("value", ["drop-newest", "", 3])
def test_an_unknown_policy_is_a_400_naming_the_field(live: LiveServer, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        live.client().chat.completions.create(model=live.model, messages=long_chat(turns=1), max_tokens=4,  # type: ignore[arg-type]
                                              extra_body={"context_overflow": value})
    assert caught.value.status_code == 400 and caught.value.param == "context_overflow"


def test_not_even_the_last_turn_fitting_is_the_usual_400(dropping: LiveServer) -> None:
    messages = [SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "phones " * 1200}]
    with pytest.raises(openai.BadRequestError) as caught:
        dropping.client().chat.completions.create(model=dropping.model, messages=messages, max_tokens=4)  # type: ignore[arg-type]
    assert caught.value.code == "context_length_exceeded"


def test_the_server_setting_drops_unless_the_request_says_error(dropping: LiveServer) -> None:
    client = dropping.client()
    raw = client.chat.completions.with_raw_response.create(model=dropping.model, messages=long_chat(), max_tokens=4)  # type: ignore[arg-type]
    assert int(raw.headers[HEADER]) > 0
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=dropping.model, messages=long_chat(), max_tokens=4,  # type: ignore[arg-type]
                                       extra_body={"context_overflow": "error"})
    assert caught.value.code == "context_length_exceeded"


def test_history_as_generated_keeps_the_think_block_of_earlier_replies(live: LiveServer, dropping: LiveServer) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"}]

    def prompt(server: LiveServer) -> str:
        r = httpx.post(server.base_url + "/apply-template", json={"model": server.model, "messages": messages}, timeout=10)
        assert r.status_code == 200
        return str(r.json()["prompt"])

    empty = "<|im_start|>assistant\n<think>\n\n</think>\n\nHello.<|im_end|>"
    assert empty in prompt(dropping)
    assert "<|im_start|>assistant\nHello.<|im_end|>" in prompt(live)  # the template's own, by default


def test_the_cut_stays_while_the_chat_goes_on_so_the_phone_reuses_what_it_kept(dropping: LiveServer) -> None:
    """Turn after turn of a chat over the context: the oldest turns are dropped at once, then the cut
    stays where it is (the kept prefix does not move) until the chat outgrows the context again; while
    it stays, the phone reuses the prompt it processed the turn before."""
    client, context = dropping.client(), context_of(dropping)
    messages = long_chat()
    cuts: list[int] = []
    for turn in range(5):
        raw = client.chat.completions.with_raw_response.create(model=dropping.model, messages=messages,  # type: ignore[arg-type]
                                                               max_tokens=6, temperature=0.0)
        r = raw.parse()
        dropped = int(raw.headers.get(HEADER, "0"))
        assert r.usage is not None and r.usage.prompt_tokens_details is not None
        kept = [SYSTEM, *messages[1 + dropped:]]
        assert r.usage.prompt_tokens == tokens_of(dropping, kept) and r.usage.prompt_tokens + 6 <= context
        if cuts and dropped == cuts[-1]:
            assert r.usage.prompt_tokens_details.cached_tokens > 0, f"turn {turn}: nothing reused"
        elif cuts:  # the cut moved: only because the chat from the old cut no longer fitted
            assert dropped > cuts[-1]
            assert tokens_of(dropping, [SYSTEM, *messages[1 + cuts[-1]:]]) + 6 > context
        cuts.append(dropped)
        messages += [{"role": "assistant", "content": r.choices[0].message.content or ""},
                     {"role": "user", "content": f"And then {turn}?"}]
    assert cuts[0] > 0 and len(set(cuts)) <= 2  # a few short turns move the cut once at most
