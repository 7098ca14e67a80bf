"""A bundle that ships its own chat template is rendered with it, end to end (own lab and server)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import BASE_KNOBS, ServerThread, wait_ready

TEMPLATE = (
    "SYSTEM-FROM-BUNDLE\n"
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def bundle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    with SimLab(phones=1, speed=0, sim_config=BASE_KNOBS) as lab:
        lab.phones[0].phone_path("/data/local/tmp/wq/qwen35/chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
        settings = Settings(adb_servers=[lab.adb_server], sim=0,
                            tokenizer_cache=str(tmp_path_factory.mktemp("tokenizers")))
        with ServerThread(create_app(settings)) as st:
            base = f"http://127.0.0.1:{st.port}"
            yield base, wait_ready(base)


def test_tokenize_renders_messages_with_the_bundles_template(bundle_server: tuple[str, str]) -> None:
    base, model = bundle_server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    r = httpx.post(base + "/tokenize", json={"model": model, "messages": messages}, timeout=10)
    r.raise_for_status()
    body = r.json()
    assert body["prompt"] == "SYSTEM-FROM-BUNDLE\n[system] be brief\n[user] hello\n[assistant]"
    assert body["count"] == len(body["tokens"]) > 0
    source = Path(body["template_source"])
    assert source.name == "chat_template.jinja" and source.read_text(encoding="utf-8") == TEMPLATE
    applied = httpx.post(base + "/apply-template", json={"model": model, "messages": messages},
                         timeout=10)
    assert applied.json()["prompt"] == body["prompt"]
