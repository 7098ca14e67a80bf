"""The docs' shell examples, run as written (curl, jq, python3) against the live server: an example a
reader copies must work. ``curl`` fails on an HTTP error here (a ``.curlrc`` with ``fail-with-body``),
so an example that gets a 400 fails the test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.live_server import LiveServer

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/chat.md", "docs/api.md"]
FENCE = re.compile(r"^```(?:sh|bash|shell)\n(.*?)^```", re.DOTALL | re.MULTILINE)
LOCAL = re.compile(r"(?:http://)?(?:localhost|127\.0\.0\.1):8000")  # the default address in the docs


def examples(doc: str) -> Iterator[str]:
    """The shell blocks of ``doc`` that call the server at its default address."""
    for block in FENCE.findall((ROOT / doc).read_text(encoding="utf-8")):
        if "curl" in block and LOCAL.search(block):
            yield block


def test_chat_docs_have_examples_to_run() -> None:
    assert list(examples("docs/chat.md")) and list(examples("README.md"))


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")
@pytest.mark.parametrize(
    "block", [pytest.param(b, id=f"{doc}:{n}") for doc in DOCS for n, b in enumerate(examples(doc))]
)
def test_doc_example_runs_as_written(live: LiveServer, block: str, tmp_path: Path) -> None:
    (tmp_path / ".curlrc").write_text("fail-with-body\nmax-time = 60\n")
    script = LOCAL.sub(live.base_url, block)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CURL_HOME": str(tmp_path)}, check=False)
    assert r.returncode == 0, (script, r.stdout[-2000:], r.stderr[-2000:])
    assert r.stdout.strip() and "null" not in r.stdout.splitlines(), r.stdout[-2000:]
