"""Helpers of the console's browser tests: a server on simulated phones, and pages that fail the test on
any script error, console error (a CSP violation is one) or failed request other than those a test
expects."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import ServerThread, wait_ready

try:
    from playwright.sync_api import expect
except ImportError:  # the ``browser`` fixture skips every test, saying what to install
    expect = None

CHROMIUM_ENV = "QHX_CHROMIUM"
WIDE = {"width": 1920, "height": 1080}
PHONE = {"width": 390, "height": 844}  # a phone's CSS pixels (iPhone 12-15 size)


@dataclass
class Console:
    base_url: str
    lab: SimLab
    settings: Settings
    model: str = ""
    key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def devices(self) -> list[dict[str, Any]]:
        r = httpx.get(self.base_url + "/v1/devices", headers=self.headers(), timeout=5)
        r.raise_for_status()
        return list(r.json()["data"])

    def phone(self, serial: str) -> dict[str, Any]:
        return next(p for p in self.devices() if p["serial"] == serial)

    def requests(self, **params: Any) -> list[dict[str, Any]]:
        r = httpx.get(self.base_url + "/v1/requests", params=params, headers=self.headers(), timeout=5)
        r.raise_for_status()
        return list(r.json()["data"])


@contextlib.contextmanager
def console_server(phones: int, *, sim_config: dict[str, Any] | None = None, **settings: Any) -> Iterator[Console]:
    """A lab of simulated phones and the real server on it (ready: its model warm)."""
    with SimLab(phones=phones, speed=1, sim_config={"load_s": 0.0, **(sim_config or {})}) as lab:
        the_settings = Settings(adb_servers=[lab.adb_server], sim=0, sse_ping_s=1.0, **settings)
        with ServerThread(create_app(the_settings)) as st:
            base = f"http://127.0.0.1:{st.port}"
            keys = the_settings.api_keys
            console = Console(base, lab, the_settings, key=keys[0] if keys else None)
            if not keys:
                console.model = wait_ready(base)
            yield console


@dataclass
class PageWatch:
    """What went wrong in a page: script errors, console errors, failed requests."""

    errors: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)  # substrings of console errors a test expects

    def check(self) -> None:
        unexpected = [e for e in self.errors if not any(a in e for a in self.allowed)]
        assert not unexpected, unexpected


@contextlib.contextmanager
def open_page(browser: Any, url: str, *, viewport: dict[str, int] | None = None, dark: bool = False,
              allow: tuple[str, ...] = ()) -> Iterator[tuple[Any, PageWatch]]:
    """A new page (own context: own sessionStorage) at ``url``; at the end, no unexpected errors."""
    context = browser.new_context(viewport=viewport or WIDE, color_scheme="dark" if dark else "light")
    page = context.new_page()
    watch = PageWatch(allowed=list(allow))
    page.on("pageerror", lambda e: watch.errors.append(f"pageerror: {e}"))
    page.on("console", lambda m: watch.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.set_default_timeout(10_000)
    expect.set_options(timeout=10_000)
    try:
        page.goto(url)
        yield page, watch
        watch.check()
    finally:
        context.close()


def wait_until(check: Callable[[], bool], within_s: float, what: str, interval_s: float = 0.05) -> float:
    """Seconds until ``check()`` held; fails after ``within_s`` saying ``what`` did not happen."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > within_s:
            raise AssertionError(f"{what}: not within {within_s} s")
        time.sleep(interval_s)
    return time.monotonic() - t0
