"""/v1/completions on a phone that only has the one-shot CLI (text out, no ids): same API."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from server.api.app import create_app
from server.serving.tokens import HostTokenizer
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import BASE_KNOBS, ServerThread, wait_ready


@pytest.fixture(scope="module")
def oneshot() -> Iterator[tuple[openai.OpenAI, str, str]]:
    with (
        SimLab(phones=1, speed=0, sim_config={**BASE_KNOBS, "no_session": True}) as lab,
        ServerThread(create_app(Settings(adb_servers=[lab.adb_server], sim=0))) as st,
    ):
        base = f"http://127.0.0.1:{st.port}"
        model = wait_ready(base)
        assert httpx.get(base + "/v1/devices").json()["data"][0]["mode"] == "oneshot"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        yield client, model, base
        client.close()


def test_oneshot_completion_text_and_usage(oneshot: tuple[openai.OpenAI, str, str], tokenizer: HostTokenizer) -> None:
    client, model, _ = oneshot
    r = client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0)
    text = r.choices[0].text
    assert text and "\ufffd" not in text
    assert r.usage is not None and r.usage.prompt_tokens == len(tokenizer.encode("Hello"))
    assert r.usage.completion_tokens == len(tokenizer.encode(text))  # one-shot: counted on the text
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_oneshot_stop_string(oneshot: tuple[openai.OpenAI, str, str]) -> None:
    client, model, _ = oneshot
    full = client.completions.create(model=model, prompt="Hello", max_tokens=30, temperature=0).choices[0].text
    words = full.split()
    stop = words[len(words) // 2]
    r = client.completions.create(model=model, prompt="Hello", max_tokens=30, temperature=0, stop=stop)
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
