"""API keys (Bearer, 401 in OpenAI's envelope), open probes, /metrics open or keyed, CORS, and the
warning for a server exposed without a key. Servers on an adb server with no phone: auth runs before
any phone would matter."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.api.app import create_app
from server.api.auth import MISSING_KEY, WRONG_KEY, ApiKeyMiddleware, warn_if_exposed
from server.cli import add_settings_arguments, settings_from_args
from server.settings import Settings, SettingsInvalid
from server.sim.harness import SimLab
from tests.api.live_server import LiveServer, ServerThread

KEYS = ["sk-one", "sk-two"]
ORIGIN = "https://app.example"


@dataclass
class Keyed:
    base: str  # keys, CORS for ORIGIN, /metrics open
    metrics_keyed: str  # keys, /metrics keyed too

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def keyed() -> Iterator[Keyed]:
    with SimLab(phones=0) as lab:
        common = {"adb_servers": [lab.adb_server], "sim": 0, "api_keys": KEYS}
        with (
            ServerThread(create_app(Settings(**common, cors_origins=[ORIGIN]))) as a,
            ServerThread(create_app(Settings(**common, metrics_require_key=True))) as b,
        ):
            yield Keyed(f"http://127.0.0.1:{a.port}", f"http://127.0.0.1:{b.port}")


def test_wrong_key_is_401_in_the_openai_envelope(keyed: Keyed) -> None:
    with keyed.client("sk-wrong") as client, pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    err = info.value
    assert err.status_code == 401
    assert err.body == {"message": WRONG_KEY, "type": "authentication_error", "param": None, "code": "invalid_api_key"}
    assert err.response.headers["www-authenticate"] == "Bearer"
    assert err.response.headers["x-request-id"].startswith("req-")


def test_missing_key_says_how_to_send_one(keyed: Keyed) -> None:
    r = httpx.get(keyed.base + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["message"] == MISSING_KEY
    r = httpx.get(keyed.base + "/v1/models", headers={"Authorization": "Basic c2stb25lOg=="})
    assert r.status_code == 401 and r.json()["error"]["message"] == MISSING_KEY


def test_each_key_gets_through_to_the_api(keyed: Keyed) -> None:
    for key in KEYS:
        with keyed.client(key) as client:
            assert client.models.list().data == []  # no phone on this adb server
            with pytest.raises(openai.NotFoundError):  # past auth: the API's own answer
                client.completions.create(model="qwen3.5-0.8b", prompt="hi", max_tokens=1)
    r = httpx.get(keyed.base + "/v1/models", headers={"Authorization": "bearer sk-two"})  # scheme: any case
    assert r.status_code == 200


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
    ("GET", "/v1/models/qwen3.5-0.8b"), ("GET", "/v1/devices"), ("POST", "/tokenize"), ("POST", "/apply-template"),
    ("GET", "/v1/not-a-route"), ("GET", "/anything-else"),
])
def test_every_path_but_the_open_ones_needs_the_key(keyed: Keyed, method: str, path: str) -> None:
    r = httpx.request(method, keyed.base + path, json={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_probes_stay_open_and_metrics_by_setting(keyed: Keyed) -> None:
    assert httpx.get(keyed.base + "/health").json() == {"status": "ok"}
    assert httpx.get(keyed.base + "/ready").status_code == 503  # no phone, but not a 401
    assert httpx.get(keyed.base + "/metrics").status_code == 200
    assert httpx.get(keyed.metrics_keyed + "/health").status_code == 200
    assert httpx.get(keyed.metrics_keyed + "/metrics").status_code == 401
    r = httpx.get(keyed.metrics_keyed + "/metrics", headers={"Authorization": "Bearer sk-one"})
    assert r.status_code == 200 and "qhx:num_requests_waiting" in r.text


def test_401s_are_counted_under_their_route(keyed: Keyed) -> None:
    def count() -> float:
        text = httpx.get(keyed.base + "/metrics").text
        line = 'http_requests_total{handler="/v1/models/{model:path}",method="GET",status="401"} '
        return next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(line)), 0.0)

    before = count()
    httpx.get(keyed.base + "/v1/models/whatever")
    assert count() == before + 1


def test_cors_preflight_needs_no_key_and_allows_the_origin(keyed: Keyed) -> None:
    r = httpx.options(keyed.base + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    other = httpx.options(keyed.base + "/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
    })
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_cors_headers_on_answers_even_a_401(keyed: Keyed) -> None:
    r = httpx.get(keyed.base + "/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN  # the page can read why
    r = httpx.get(keyed.base + "/v1/models", headers={"Origin": ORIGIN, "Authorization": "Bearer sk-one"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    exposed = r.headers["access-control-expose-headers"].lower()
    # every header of ours a page may need to read: the request id, and what the server did with the request
    for header in ("x-request-id", "retry-after", "x-qhx-ignored-params", "x-qhx-context-dropped"):
        assert header in exposed, header


def test_no_cors_unless_configured(live: LiveServer) -> None:
    r = httpx.options(live.base_url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
    })
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in httpx.get(live.base_url + "/v1/models", headers={"Origin": ORIGIN}).headers


@pytest.mark.parametrize(("host", "keys", "warns"), [
    ("0.0.0.0", [], True), ("::", [], True), ("192.168.1.20", [], True), ("bench-1.lan", [], True),
    ("0.0.0.0", ["sk-one"], False), ("127.0.0.1", [], False), ("::1", [], False), ("localhost", [], False),
])
def test_warns_when_exposed_without_a_key(host: str, keys: list[str], warns: bool,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.api.auth"):
        assert warn_if_exposed(Settings(host=host, api_keys=keys)) is warns
    assert any("without an API key" in r.getMessage() for r in caplog.records) is warns


def test_keys_from_flags_and_env_and_kept_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    ns = parser.parse_args(["--api-key", "sk-a", "--api-key", "sk-b", "--cors-origin", ORIGIN,
                            "--metrics-require-key", "--log-format", "json"])
    settings = settings_from_args(ns)
    assert settings.api_keys == ["sk-a", "sk-b"] and settings.cors_origins == [ORIGIN]
    assert settings.metrics_require_key is True and settings.log_format == "json"
    assert "sk-a" not in repr(settings)
    monkeypatch.setenv("QHX_API_KEYS", '["sk-env"]')
    assert Settings().api_keys == ["sk-env"]


def _passes(keys: list[str], raw_authorization: bytes) -> bool:
    """Whether ApiKeyMiddleware lets a request with this Authorization header (as sent) through."""
    reached: list[bool] = []

    async def app(scope: object, receive: object, send: object) -> None:
        reached.append(True)

    async def send(message: object) -> None:
        pass

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "GET", "path": "/v1/models", "root_path": "", "query_string": b"",
             "headers": [(b"authorization", raw_authorization)], "state": {}}
    asyncio.run(ApiKeyMiddleware(app, keys=keys, open_paths=frozenset())(scope, receive, send))  # type: ignore[arg-type]
    return bool(reached)


@given(key=st.text(min_size=1, max_size=40))
def test_every_key_the_settings_accept_is_one_a_client_can_send(key: str) -> None:
    """A key with a character no HTTP client sends (the console's browser refuses anything beyond
    ISO-8859-1; httpx and openai anything beyond ASCII) or with surrounding spaces (stripped) could
    never match: such a server locked everyone out, and said nothing. Now each key is either refused
    at start-up or accepted when httpx sends it."""
    try:
        Settings(api_keys=[key])
    except SettingsInvalid:
        assert not (key.isascii() and key.isprintable() and key == key.strip())  # not refused for nothing
        return
    raw = httpx.Headers({"Authorization": f"Bearer {key}"}).raw[0][1]
    assert _passes([key], raw)
    assert not _passes([key], raw + b"x")
