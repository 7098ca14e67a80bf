"""/v1/completions and /v1/chat/completions on a phone that only has the one-shot CLI (text out, no
ids): the same API, finish reasons inferred (the CLI does not say why it stopped), and the sampling
parameters the greedy CLI cannot honour named in ``X-QHX-Ignored-Params`` (docs/api.md, "One-shot
mode")."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from server.api.app import create_app
from server.serving.tokens import HostTokenizer
from server.settings import Settings
from server.sim.harness import SimLab, SimPhone
from tests.api.live_server import BASE_KNOBS, LiveServer, ServerThread, wait_ready

HEADER = "x-qhx-ignored-params"
MESSAGES = [{"role": "user", "content": "Say something."}]


@dataclass
class OneShotServer:
    client: openai.OpenAI
    model: str
    base: str
    phone: SimPhone

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.base + path, json={"model": self.model, **body}, timeout=30)


@pytest.fixture(scope="module")
def oneshot() -> Iterator[OneShotServer]:
    with (
        SimLab(phones=1, speed=0, sim_config={**BASE_KNOBS, "no_session": True}) as lab,
        ServerThread(create_app(Settings(adb_servers=[lab.adb_server], sim=0))) as st,
    ):
        base = f"http://127.0.0.1:{st.port}"
        model = wait_ready(base)
        assert httpx.get(base + "/v1/devices").json()["data"][0]["mode"] == "oneshot"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        yield OneShotServer(client, model, base, lab.phones[0])
        client.close()


@pytest.fixture
def natural_stop(oneshot: OneShotServer) -> Iterator[None]:
    """The runtime ends its answer by itself (a stop id) at the first sentence end after 3 tokens."""
    oneshot.phone.configure(stop_rate=1.0, min_tokens=3)
    yield
    oneshot.phone.configure(**BASE_KNOBS, min_tokens=8)


def test_oneshot_completion_text_and_usage(oneshot: OneShotServer, tokenizer: HostTokenizer) -> None:
    client, model = oneshot.client, oneshot.model
    r = client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert text and "\ufffd" not in text
    assert r.usage is not None and r.usage.prompt_tokens == len(tokenizer.encode("Hello"))
    assert r.usage.completion_tokens == len(tokenizer.encode(text)) == 12  # one-shot: counted on the text
    assert r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_oneshot_stop_string(oneshot: OneShotServer, tokenizer: HostTokenizer) -> None:
    client, model = oneshot.client, oneshot.model
    full = client.completions.create(model=model, prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    words = full.split()
    stop = words[len(words) // 2]
    want = full[: full.find(stop)]
    r = client.completions.create(model=model, prompt="Hello", max_tokens=30, temperature=0, stop=stop)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens == len(tokenizer.encode(want + stop))
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=30, temperature=0, stop=stop,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


@pytest.mark.usefixtures("natural_stop")
@pytest.mark.parametrize("stream", [False, True])
def test_runtime_ending_before_max_tokens_is_stop_and_max_tokens_is_length(
    oneshot: OneShotServer, tokenizer: HostTokenizer, stream: bool
) -> None:
    """The CLI exits 0 whether it reached max_new or its stop id; fewer tokens than max_tokens means
    it stopped by itself (regression: always "length")."""
    for endpoint in ("completions", "chat"):
        for max_tokens, want in ((200, "stop"), (4, "length")):
            text, finish, used = _run(oneshot, endpoint, stream=stream, max_tokens=max_tokens)
            case = (endpoint, stream, max_tokens, text)
            assert finish == want, case
            assert used == len(tokenizer.encode(text)), case
            assert (used < max_tokens) if want == "stop" else (used == max_tokens), case


def _run(s: OneShotServer, endpoint: str, *, stream: bool, **kw: Any) -> tuple[str, str | None, int]:
    """(text, finish_reason, usage.completion_tokens) of one choice at temperature 0."""
    if endpoint == "completions":
        if not stream:
            r = s.client.completions.create(model=s.model, prompt="Hello", temperature=0, **kw)
            assert r.usage is not None
            return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens
        chunks = list(s.client.completions.create(model=s.model, prompt="Hello", temperature=0, stream=True,
                                                  stream_options={"include_usage": True}, **kw))
        assert chunks[-1].usage is not None
        return ("".join(c.choices[0].text for c in chunks[:-1]), chunks[-2].choices[0].finish_reason,
                chunks[-1].usage.completion_tokens)
    if not stream:
        rc = s.client.chat.completions.create(model=s.model, messages=MESSAGES, temperature=0, **kw)  # type: ignore[arg-type]
        assert rc.usage is not None
        return rc.choices[0].message.content or "", rc.choices[0].finish_reason, rc.usage.completion_tokens
    cc = list(s.client.chat.completions.create(model=s.model, messages=MESSAGES, temperature=0,  # type: ignore[arg-type]
                                               stream=True, stream_options={"include_usage": True}, **kw))
    assert cc[-1].usage is not None
    return ("".join(c.choices[0].delta.content or "" for c in cc[:-1]), cc[-2].choices[0].finish_reason,
            cc[-1].usage.completion_tokens)


REQUESTS = {
    "/v1/completions": {"prompt": "Hello", "max_tokens": 3},
    "/v1/chat/completions": {"messages": MESSAGES, "max_tokens": 3},
}
IGNORED_CASES = [
    ({"temperature": 0.7}, "temperature"),  # LangChain's default: served, and said (streamed too)
    ({}, "temperature"),  # the spec's default temperature is 1: sampling, which the CLI cannot do
    ({"temperature": 0.7, "top_p": 0.9, "seed": 1, "top_k": 20}, "temperature,top_p,top_k,seed"),
    ({"temperature": 0, "top_p": 0.5, "seed": 3}, None),  # greedy asked: nothing is lost
    ({"temperature": 0, "repetition_penalty": 1.2}, "repetition_penalty"),
    ({"temperature": 0, "ignore_eos": True, "min_tokens": 2}, "ignore_eos,min_tokens"),  # the CLI ends at its EOS
]


@pytest.mark.parametrize("path", list(REQUESTS))
@pytest.mark.parametrize(("extra", "header"), IGNORED_CASES)
def test_parameters_the_cli_cannot_honour_are_named_in_a_header(
    oneshot: OneShotServer, path: str, extra: dict[str, Any], header: str | None
) -> None:
    for stream in (False, True) if extra == {"temperature": 0.7} else (False,):  # each request loads the model
        r = oneshot.post(path, {**REQUESTS[path], **extra, "stream": stream})
        assert r.status_code == 200, r.text
        assert r.headers.get(HEADER) == header, (stream, dict(r.headers))


def test_the_header_reaches_the_openai_client(oneshot: OneShotServer) -> None:
    raw = oneshot.client.chat.completions.with_raw_response.create(
        model=oneshot.model, messages=MESSAGES, max_tokens=3, temperature=0.7,  # type: ignore[arg-type]
    )
    assert raw.headers[HEADER] == "temperature" and raw.parse().choices[0].message.content


@pytest.mark.parametrize("path", list(REQUESTS))
def test_n_above_one_with_sampling_is_refused_and_greedy_n_is_served(oneshot: OneShotServer, path: str) -> None:
    for extra in ({"temperature": 0.8}, {}):
        r = oneshot.post(path, {**REQUESTS[path], "n": 2, **extra})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "n" and err["code"] == "unsupported_parameter" and "one-shot" in err["message"]
    r = oneshot.post(path, {**REQUESTS[path], "n": 2, "temperature": 0})
    assert r.status_code == 200 and HEADER not in r.headers
    choices = r.json()["choices"]
    assert len(choices) == 2 and choices[0].get("text", choices[0].get("message")) == choices[1].get(
        "text", choices[1].get("message"))


@pytest.mark.parametrize("path", list(REQUESTS))
def test_session_phones_honour_sampling_so_no_header(live: LiveServer, path: str) -> None:
    body = {**REQUESTS[path], "model": live.model, "temperature": 0.7, "top_p": 0.9, "seed": 1, "n": 2}
    r = httpx.post(live.base_url + path, json=body, timeout=30)
    assert r.status_code == 200 and HEADER not in r.headers
