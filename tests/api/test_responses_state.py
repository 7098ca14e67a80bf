"""A conversation continued with previous_response_id goes back to the phone that holds its state
(docs/state-reuse.md, "Routing"): two conversations interleaved on two simulated phones, each turn
served by the phone of its conversation, with at least the previous turn's prompt (up to its
generation prompt) cached."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import BASE_KNOBS, LiveServer, ServerThread, wait_ready
from tests.api.test_logging import access_log


@pytest.fixture(scope="module")
def two_phones() -> Iterator[LiveServer]:
    # at the real rate: each phone measures its own cost per prompt token, and at speed 0 that is host
    # noise, whose ratio (not the prompt) then decides where a new conversation goes
    with SimLab(phones=2, sim_config={**BASE_KNOBS, "speed": 1}) as lab:
        settings = Settings(adb_servers=[lab.adb_server], sim=0)
        with ServerThread(create_app(settings)) as st:
            base = f"http://127.0.0.1:{st.port}"
            server = LiveServer(base, wait_ready(base), lab.phones[0], settings)
            yield server
            if server._client is not None:
                server._client.close()


def kept_tokens(live: LiveServer, messages: list[dict[str, Any]]) -> int:
    """The tokens of the conversation's prompt up to its generation prompt: what the phone keeps."""
    r = httpx.post(live.base_url + "/tokenize", timeout=10, json={
        "model": live.model, "messages": messages, "add_generation_prompt": False})
    return int(r.json()["count"])


def test_each_turn_goes_to_the_phone_holding_its_conversation(two_phones: LiveServer) -> None:
    live, client = two_phones, two_phones.client()
    conversations = {
        "a": (["Name a phone maker.", "Where is it based?", "Since when?"], "You answer about phones."),
        "b": (["Which river is longest?", "How long is it?", "Which countries?"], "You answer about rivers."),
    }
    state: dict[str, dict[str, Any]] = {
        name: {"messages": [{"role": "system", "content": instructions}], "previous": None, "phone": None}
        for name, (_, instructions) in conversations.items()
    }
    with access_log() as logs:
        for turn in range(3):
            for name, (questions, instructions) in conversations.items():
                s = state[name]
                s["messages"].append({"role": "user", "content": questions[turn]})
                rid = f"trace-responses-{name}-{turn}"
                r = client.responses.create(model=live.model, instructions=instructions, input=questions[turn],
                                            previous_response_id=s["previous"], max_output_tokens=8,
                                            temperature=0.0, extra_headers={"X-Request-ID": rid})
                assert r.usage is not None
                phone = logs.access(rid)["phone"]
                if turn:
                    assert phone == s["phone"], f"conversation {name} turn {turn} moved phones"
                    assert s["kept"] <= r.usage.input_tokens_details.cached_tokens < r.usage.input_tokens
                s["kept"] = kept_tokens(live, s["messages"])
                s["messages"].append({"role": "assistant", "content": r.output_text})
                s["previous"], s["phone"] = r.id, phone
    assert state["a"]["phone"] != state["b"]["phone"]  # nothing to reuse at first: they spread
