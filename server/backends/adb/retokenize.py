"""Text <-> token ids for the one-shot runtime, which takes a prompt as text and prints text.

The backend contract carries token ids only, so one-shot mode converts below it, with the bundle's own
tokenizer (``ModelInfo.tokenizer_path``, the host copy). The tokenizer is loaded without its
normalizer (Qwen's is NFC): byte-level BPE then round-trips exactly, ``decode(encode(text)) == text``,
so the text a client sees is exactly the text the CLI printed. What the model sees does not change:
the CLI normalizes the prompt itself, and ``NFC(decode(ids))`` tokenizes to the same ids.

:class:`Retokenizer` turns streamed text into ids. A tokenizer splits text into pre-tokens (words,
runs of spaces, punctuation, special tokens) and encodes each on its own, so only the end can change
when more text comes: the last pre-token, the run of spaces before it, and a special token that is not
complete yet (``<|im_e``). It emits the ids of the pre-tokens before those, holds the rest back until
more text or the end, and so emits exactly ``encode(all the text)``, one piece at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from tokenizers import Tokenizer, decoders

from server.bytelevel import byte_decoder
from server.memory import settle_heap


def load_tokenizer(path: str) -> Tokenizer:
    """The tokenizer.json at ``path``, without its normalizer (see the module docstring). Blocking
    (about half a second for Qwen3.5): call it in a worker thread."""
    tokenizer = Tokenizer.from_file(path)
    tokenizer.normalizer = None
    settle_heap()  # the parse's peak out of the RSS (server/memory.py)
    return tokenizer


_shared: dict[str, tuple[Tokenizer, Callable[[int], bytes | None] | None]] = {}
_shared_lock = threading.Lock()


def shared_tokenizer(path: str) -> tuple[Tokenizer, Callable[[int], bytes | None] | None]:
    """:func:`load_tokenizer` of ``path`` and its :func:`token_bytes`, loaded once per process and
    shared by every phone serving that bundle (a Qwen3.5 tokenizer is ~100 MB and seconds to load).
    Blocking: call it in a worker thread."""
    with _shared_lock:
        got = _shared.get(path)
        if got is None:
            tokenizer = load_tokenizer(path)
            got = _shared[path] = tokenizer, token_bytes(tokenizer)
        return got


def decode(tokenizer: Tokenizer, ids: Sequence[int]) -> str:
    """The text of ``ids``, special tokens written out (as the CLI reads them in a prompt)."""
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def token_bytes(tokenizer: Tokenizer) -> Callable[[int], bytes | None] | None:
    """A function from a token id to its raw bytes, None for an added (special) token, memoized; None
    for a tokenizer that is not byte-level (its tokens have no exact bytes). State reuse compares
    texts with it (reuse.py), exactly, where decoding would be lossy on split UTF-8 sequences; a
    special token has no bytes there: it is the same input to the model only as itself, not as the
    ordinary tokens that spell its text."""
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
        return None
    specials = set(tokenizer.get_added_tokens_decoder())
    table = byte_decoder()
    memo: dict[int, bytes] = {}

    def of(token: int) -> bytes | None:
        if token in specials:
            return None
        got = memo.get(token)
        if got is None:
            piece = tokenizer.id_to_token(token)
            got = memo[token] = b"" if piece is None else bytes(table[c] for c in piece if c in table)
        return got

    return of


class Retokenizer:
    """Streamed text in, token ids out: ``feed`` each piece of text, then ``flush`` at the end. The ids
    emitted are those of ``encode(all the text)``, and decode to exactly that text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._pending = ""  # text whose ids are not emitted yet
        specials = [t.content for t in tokenizer.get_added_tokens_decoder().values()]
        # every proper prefix of a special token: text that may become one when more comes
        self._partial = {s[:n] for s in specials for n in range(1, len(s))}
        self._longest_partial = max((len(p) for p in self._partial), default=0)
        self.count = 0  # ids emitted so far

    def feed(self, text: str) -> list[int]:
        """The ids that ``text`` (added to what came before) settled; [] while they may still change."""
        self._pending += text
        settled = self._pending[: self._settled_end()]
        enc = self._tokenizer.encode(settled, add_special_tokens=False)
        firsts = _pre_token_starts(enc.word_ids)  # index of each pre-token's first token
        # held back: the last pre-token, and the run of spaces before it (`` \n`` + `` `` is one
        # pre-token, `` \n \n``, once a newline follows)
        k = len(firsts) - 1
        while k > 0 and settled[enc.offsets[firsts[k - 1]][0] : enc.offsets[firsts[k]][0]].isspace():
            k -= 1
        if k <= 0:
            return []
        self._pending = self._pending[enc.offsets[firsts[k]][0] :]
        return self._emit(enc.ids[: firsts[k]])

    def flush(self) -> list[int]:
        """The ids of the text held back: the end of the text."""
        pending, self._pending = self._pending, ""
        return self._emit(self._tokenizer.encode(pending, add_special_tokens=False).ids) if pending else []

    def _settled_end(self) -> int:
        """Where the pending text stops being settled: before an unfinished special token at its end."""
        text = self._pending
        for n in range(min(self._longest_partial, len(text)), 0, -1):
            if text[-n:] in self._partial:
                return len(text) - n
        return len(text)

    def _emit(self, ids: list[int]) -> list[int]:
        self.count += len(ids)
        return ids


def _pre_token_starts(word_ids: Sequence[int | None]) -> list[int]:
    """Indexes of the tokens that begin a pre-token (a special token is one of its own)."""
    return [i for i, w in enumerate(word_ids) if i == 0 or w is None or w != word_ids[i - 1]]
