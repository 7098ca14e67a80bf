"""The console in a real headless Chromium (Debian's package, scripts/install-browser) driven by
Playwright, against the real server on simulated phones. One browser per test module; each test opens
its own page (a fresh tab, its own sessionStorage).

Without a browser (no chromium on the machine, or Playwright missing) every test here is skipped, and
the reason says what to install. Screenshots go to ``QHX_CONSOLE_SHOTS`` when set (docs/console.md is
made from them: ``QHX_CONSOLE_SHOTS=docs/console pytest tests/console``), else to a temporary folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console.browser import CHROMIUM_ENV


def _chromium() -> str | None:
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given if Path(given).exists() else None
    return next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium for the module (skips every test of the module when there is none)."""
    path = _chromium()
    if path is None:
        pytest.skip(f"no Chromium: run scripts/install-browser (Debian's chromium), or set {CHROMIUM_ENV}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright missing: pip install -e '.[test]'")
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        chromium = pw.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go (see the module docstring)."""
    given = os.environ.get("QHX_CONSOLE_SHOTS")
    folder = Path(given) if given else tmp_path_factory.mktemp("console-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
