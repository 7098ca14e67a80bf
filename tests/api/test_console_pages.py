"""The console's page and files: served at / and /console from the package (nothing from elsewhere),
with a strict Content-Security-Policy; open without a key while everything else stays keyed; gone when
the setting turns the console off."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from server.api import console
from server.api.app import create_app
from server.api.auth import open_paths
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import LiveServer, ServerThread

KEY = "sk-console"


@dataclass
class Servers:
    keyed: str
    off: str
    keyed_settings: Settings
    routes: list[str]  # every route path of the keyed app


def all_routes(routes: Iterable[Any]) -> Iterator[Route]:
    """Every route, into included routers (FastAPI keeps those as one entry each)."""
    for r in routes:
        if isinstance(r, Route):
            yield r
        elif hasattr(r, "original_router"):
            yield from all_routes(r.original_router.routes)


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with SimLab(phones=0) as lab:
        common = {"adb_servers": [lab.adb_server], "sim": 0}
        keyed_settings = Settings(**common, api_keys=[KEY])
        app = create_app(keyed_settings)
        routes = sorted({r.path for r in all_routes(app.router.routes)})
        with ServerThread(app) as a, ServerThread(create_app(Settings(**common, console=False))) as b:
            yield Servers(f"http://127.0.0.1:{a.port}", f"http://127.0.0.1:{b.port}", keyed_settings, routes)


def test_page_at_root_and_console_with_a_strict_policy(live: LiveServer) -> None:
    pages = [httpx.get(live.base_url + path, timeout=5) for path in ("/", "/console")]
    assert all(r.status_code == 200 for r in pages)
    assert pages[0].text == pages[1].text and "<title>qhx-server console</title>" in pages[0].text
    headers = pages[0].headers
    assert headers["content-type"] == "text/html; charset=utf-8"
    policy = headers["content-security-policy"]
    assert "script-src 'self';" in policy and "default-src 'none'" in policy and "unsafe" not in policy
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"


def test_every_file_the_page_names_is_served_from_the_package(live: LiveServer) -> None:
    page = httpx.get(live.base_url + "/console", timeout=5).text
    named = re.findall(r'(?:src|href)="([^"]+)"', page)
    local = [u for u in named if not u.startswith(("#", "data:"))]
    assert sorted(local) == sorted(f"/console/{name}" for name in console.ASSETS)
    types = {"js": "text/javascript", "css": "text/css"}
    for url in local:
        r = httpx.get(live.base_url + url, timeout=5)
        assert r.status_code == 200 and r.headers["content-type"].startswith(types[url.rsplit(".", 1)[1]])
        assert r.content == (console.STATIC / url.rsplit("/", 1)[1]).read_bytes()


def test_nothing_is_loaded_from_the_network() -> None:
    """No CDN, no fonts, no analytics: the only absolute URL in the console is the SVG namespace."""
    for item in console.STATIC.iterdir():
        text = item.read_text(encoding="utf-8")
        urls = set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (item.name, urls)


def test_the_console_never_writes_html_from_strings() -> None:
    """Text from the server reaches the page as text only: no innerHTML, outerHTML, insertAdjacentHTML,
    document.write or eval anywhere (the browser tests show a reply's markup staying text)."""
    script = (console.STATIC / "console.js").read_text(encoding="utf-8")
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setTimeout(\"", "javascript:",
                 # markup parsed from a string, and the attributes that load or run what they name
                 "createContextualFragment", "DOMParser", "srcdoc", "href", "src", "action", "formaction",
                 "setAttribute(\"on", "setAttributeNS"):
        assert sink not in code, sink


@pytest.mark.parametrize("path", ["/console/nope.js", "/console/..%2Fsettings.py", "/console/index.html/x",
                                  "/console.js"])
def test_unknown_console_paths_are_404_in_the_envelope(live: LiveServer, path: str) -> None:
    r = httpx.get(live.base_url + path, timeout=5)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_the_setting_turns_the_console_off(servers: Servers) -> None:
    for path in ["/", "/console", *(f"/console/{name}" for name in console.ASSETS)]:
        assert httpx.get(servers.off + path, timeout=5).status_code == 404, path
    assert httpx.get(servers.off + "/v1/requests", timeout=5).status_code == 200  # the API stays


def test_with_keys_the_console_opens_but_its_data_needs_the_key(servers: Servers) -> None:
    for path in ["/", "/console", *(f"/console/{name}" for name in console.ASSETS)]:
        assert httpx.get(servers.keyed + path, timeout=5).status_code == 200, path
    for path in ["/v1/devices/events", "/v1/requests", "/v1/models", "/v1/devices"]:
        r = httpx.get(servers.keyed + path, timeout=5)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    r = httpx.get(servers.keyed + "/v1/requests", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert r.status_code == 200


def test_every_route_but_the_open_ones_needs_the_key(servers: Servers) -> None:
    """Across all routes of the app (today's and any added later): only the probes, the docs, /metrics
    and the console's files answer without a key."""
    opened = open_paths(servers.keyed_settings)
    for path in servers.routes:
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        for method in ("GET", "POST"):
            r = httpx.request(method, servers.keyed + concrete, timeout=5)
            if path in opened or concrete in opened:
                assert r.status_code != 401, (method, path)
            else:
                assert r.status_code == 401, (method, path, r.status_code)
    assert {"/v1/devices/events", "/v1/requests", "/console/{name}"} <= set(servers.routes)
