"""Host cache of a bundle's tokenizer and chat template files (device-protocol.md section 2).

A bundle's ``tokenizer.json`` is cached as ``<cache>/<sha256>/tokenizer.json``. A bundle that also
ships ``chat_template.jinja`` or ``tokenizer_config.json`` gets its own folder, keyed by a hash of
all its files' sha256s, holding those files and a hard link (or copy) of the tokenizer: the chat
template is found next to the tokenizer (``load_chat_template``), so two bundles with one tokenizer
but different templates must not share a folder. Files are pulled only when not cached, written
atomically (temporary file, then ``os.replace``), and checked against the phone's sha256.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

from server.backends.adb.quoting import sh_quote
from server.backends.adb.transport import AdbServerClient, pull_file, run_shell
from server.errors import PhoneLost
from server.settings import Settings

logger = logging.getLogger(__name__)

TOKENIZER = "tokenizer.json"
TEMPLATE_FILES = ("chat_template.jinja", "tokenizer_config.json")  # what load_chat_template reads
_SHA_LINE = re.compile(r"^(?P<sha>[0-9a-fA-F]{64})\s+\*?(?P<path>.+)$")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def folder_key(tokenizer_sha: str, template_shas: dict[str, str]) -> str:
    """The cache folder name: the tokenizer's sha256 alone, or a hash of it and the template files'."""
    if not template_shas:
        return tokenizer_sha
    parts = [f"{TOKENIZER}:{tokenizer_sha}", *(f"{n}:{template_shas[n]}" for n in sorted(template_shas))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def parse_listing(text: str) -> tuple[set[str], dict[str, str]]:
    """(present file names, name -> sha256) from the ``has:<name>`` and ``sha256sum`` lines."""
    present, shas = set(), {}
    for line in text.splitlines():
        if line.startswith("has:"):
            present.add(line[4:].strip())
        elif m := _SHA_LINE.match(line.strip()):
            shas[m["path"].rsplit("/", 1)[-1]] = m["sha"].lower()
    return present, shas


async def ensure_tokenizer(
    client: AdbServerClient, serial: str, bundle_dir: str, settings: Settings
) -> tuple[str, Path]:
    """(sha256 of tokenizer.json, its host path in a folder that also holds the bundle's template
    files, if any); pulls only what the cache lacks."""
    cache = Path(settings.tokenizer_cache).expanduser()
    remote = {n: f"{bundle_dir}/{n}" for n in (TOKENIZER, *TEMPLATE_FILES)}
    quoted = " ".join(sh_quote(p) for p in remote.values())
    # one process: which files exist (sha256sum may be missing on the phone) and their hashes
    script = f'for f in {quoted}; do [ -f "$f" ] && echo "has:${{f##*/}}"; done; sha256sum {quoted} 2>/dev/null; true'
    res = await run_shell(client, serial, script, timeout=settings.adb_timeout_s)
    present, phone_shas = parse_listing(res.text())
    templates = [n for n in TEMPLATE_FILES if n in present]

    tok_sha = phone_shas.get(TOKENIZER)
    if tok_sha is None:
        logger.info("%s: no sha256sum on the phone; pulling %s to hash it", serial, remote[TOKENIZER])
    base = cache / tok_sha / TOKENIZER if tok_sha else None
    if base is None or not await asyncio.to_thread(base.is_file):
        tok_sha, tmp = await _pull(client, serial, remote[TOKENIZER], cache, tok_sha, settings)
        base = cache / tok_sha / TOKENIZER
        await asyncio.to_thread(_place, tmp, base)
        logger.info("%s: cached %s as %s", serial, remote[TOKENIZER], base)
    assert tok_sha is not None
    if not templates:
        return tok_sha, base

    # a bundle with its own template: shas from the phone, or from pulling the files (no sha256sum)
    pulled: dict[str, Path] = {}
    try:
        shas = {}
        for name in templates:
            if name in phone_shas:
                shas[name] = phone_shas[name]
            else:
                shas[name], pulled[name] = await _pull(client, serial, remote[name], cache, None, settings)
        folder = cache / folder_key(tok_sha, shas)
        final = folder / TOKENIZER
        if await asyncio.to_thread(final.is_file):  # written last: the folder is complete
            return tok_sha, final
        for name in templates:
            if name not in pulled:
                _, pulled[name] = await _pull(client, serial, remote[name], cache, shas[name], settings)
            await asyncio.to_thread(_place, pulled.pop(name), folder / name)
        await asyncio.to_thread(_link, base, final)
        logger.info("%s: cached %s with %s as %s", serial, remote[TOKENIZER], ", ".join(templates), folder)
        return tok_sha, final
    finally:
        for tmp in pulled.values():
            tmp.unlink(missing_ok=True)


async def _pull(
    client: AdbServerClient, serial: str, remote: str, cache: Path, expected: str | None, settings: Settings
) -> tuple[str, Path]:
    """Pull ``remote`` into a temporary file in ``cache``: (its sha256, the file). The caller moves
    or deletes it. PhoneLost when the pull fails, times out or does not match ``expected``."""
    await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=".pull-")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # the pull is bounded per recv by the client's timeout, and overall by this one
        async with asyncio.timeout(max(60.0, settings.adb_timeout_s)):
            await pull_file(client, serial, remote, tmp_name)
        sha = await asyncio.to_thread(_sha256_file, tmp)
        if expected is not None and sha != expected:
            raise PhoneLost(f"{serial}: {remote} changed or was corrupted while pulling (sha256 mismatch)")
        return sha, tmp
    except TimeoutError as e:
        tmp.unlink(missing_ok=True)
        raise PhoneLost(f"{serial}: pulling {remote} timed out") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _place(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)  # atomic: concurrent pulls of the same file are harmless


def _link(src: Path, final: Path) -> None:
    """Hard-link ``src`` to ``final`` (a copy where links are not possible), atomically."""
    tmp = final.with_name(f".link-{secrets.token_hex(8)}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
