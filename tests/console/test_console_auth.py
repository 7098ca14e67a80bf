"""The console on a server with API keys, in a real browser: it asks for a key, keeps it in the tab's
sessionStorage, sends it as a bearer token and never in a URL; a wrong key is refused. No phone is
attached here: the farm says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console.browser import Console, console_server, expect, open_page

pytestmark = pytest.mark.timeout(120)
KEY = "sk-console-test-7f3a"
UNAUTHORIZED = ("401",)  # the browser logs each refused call as a console error: expected here


@pytest.fixture(scope="module")
def keyed() -> Iterator[Console]:
    with console_server(0, api_keys=[KEY]) as console:
        yield console


def enter_key(page: Any, key: str) -> None:
    expect(page.locator("#key-dialog")).to_be_visible()
    page.fill("#key-input", key)
    page.press("#key-input", "Enter")


def test_the_console_asks_for_a_key_and_sends_it_as_a_bearer_token_only(browser: Any, keyed: Console,
                                                                         shots: Path) -> None:
    sent: list[tuple[str, str | None]] = []
    with open_page(browser, keyed.base_url + "/", allow=UNAUTHORIZED) as (page, _):
        page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
        expect(page.locator("#key-dialog")).to_be_visible()
        expect(page.locator("#conn")).to_have_text("API key needed")
        page.screenshot(path=str(shots / "key-prompt.png"))

        enter_key(page, "sk-wrong")
        expect(page.locator("#key-error")).to_have_text("That key was not accepted.")
        enter_key(page, KEY)
        expect(page.locator("#key-dialog")).to_be_hidden()
        expect(page.locator("#conn")).to_have_text("live")
        expect(page.locator("#farm-empty")).to_be_visible()  # no phone on this adb server
        expect(page.locator("#farm-empty")).to_contain_text("No phones attached")
        assert page.evaluate("() => sessionStorage.getItem('qhx.apiKey')") == KEY
        assert page.evaluate("() => localStorage.length") == 0 and "sk-" not in page.evaluate("() => document.cookie")
        page.screenshot(path=str(shots / "farm-empty.png"))
        page.click("#tab-requests")
        expect(page.locator("#rq-empty")).to_be_visible()
        page.reload()  # the page and its files again, now with a key in the tab
        expect(page.locator("#conn")).to_have_text("live")

    assert all(KEY not in url and "sk-wrong" not in url for url, _ in sent)
    api_calls = [(url, auth) for url, auth in sent if "/v1/" in url]
    assert any(auth == f"Bearer {KEY}" for _, auth in api_calls)
    assert all(auth in (None, f"Bearer {KEY}", "Bearer sk-wrong") for _, auth in api_calls)
    page_files = [auth for url, auth in sent if "/v1/" not in url]
    assert page_files and all(auth is None for auth in page_files)  # the page and its files need none


def test_the_key_lasts_for_the_tab_and_can_be_forgotten(browser: Any, keyed: Console) -> None:
    with open_page(browser, keyed.base_url + "/#farm", allow=UNAUTHORIZED) as (page, _):
        enter_key(page, KEY)
        expect(page.locator("#conn")).to_have_text("live")
        page.reload()
        expect(page.locator("#conn")).to_have_text("live")  # the same tab keeps it
        expect(page.locator("#key-dialog")).to_be_hidden()
        page.click("#key-button")
        page.click("#key-forget")
        expect(page.locator("#key-dialog")).to_be_visible()  # asked again at once
        assert page.evaluate("() => sessionStorage.getItem('qhx.apiKey')") is None
    with open_page(browser, keyed.base_url + "/#farm", allow=UNAUTHORIZED) as (page, _):
        expect(page.locator("#key-dialog")).to_be_visible()  # a new tab (context) starts without it


def test_a_key_no_browser_can_send_is_refused_in_the_dialog(browser: Any, keyed: Console) -> None:
    """A browser sends header values in ISO-8859-1 only, and the server takes printable ASCII keys: a key
    typed with other characters made every fetch throw, and the console said "server unreachable,
    retrying…" for ever. The dialog says what is wrong and keeps nothing."""
    with open_page(browser, keyed.base_url + "/", allow=UNAUTHORIZED) as (page, _):
        for bad in ("ключ-🔑", "sk-caf\u00e9", "sk-a\u00a0b"):
            enter_key(page, bad)
            expect(page.locator("#key-error")).to_contain_text("printable ASCII")
            expect(page.locator("#key-dialog")).to_be_visible()
            assert page.evaluate("() => sessionStorage.getItem('qhx.apiKey')") is None
        enter_key(page, KEY)
        expect(page.locator("#key-dialog")).to_be_hidden()
        expect(page.locator("#conn")).to_have_text("live")
