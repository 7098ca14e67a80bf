"""The host side of tokens: the bundle's tokenizer.json, and incremental detokenization.

Phones speak token ids (device-protocol.md: ``tok`` events carry ids, no text), so the host owns
text: it encodes prompts and turns the streamed ids back into text. Qwen's tokenizer is byte-level
BPE, so one character can span several tokens (an emoji is often 2-3 tokens) and decoding ids one by
one would produce U+FFFD halves. :class:`IncrementalDetokenizer` therefore maps ids to their raw bytes
and runs them through an incremental UTF-8 decoder: text is released as soon as each character is
complete, never earlier, never later.

Tokenizers whose decoder is not byte-level fall back to the prefix-window method of vLLM/TGI (decode
a short window and release what no longer ends in U+FFFD).
"""

from __future__ import annotations

import codecs
import logging
import math
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import anyio
from tokenizers import Tokenizer, decoders

from server.bytelevel import byte_decoder
from server.errors import ContextLengthExceeded
from server.memory import settle_heap

logger = logging.getLogger(__name__)

# Texts longer than this (characters) are tokenized in a worker thread, off the event loop.
_THREAD_ENCODE_CHARS = 16_384
# NFC normalization shrinks UTF-8 text by at most 3x (Hangul jamo L+V+T -> one syllable); 4 for margin.
_NFC_SHRINK_BOUND = 4

# Qwen3.5 specials the serving layer needs by name (qwen35.md); looked up in the vocabulary, these
# are only the fallbacks.
ENDOFTEXT = "<|endoftext|>"
IM_END = "<|im_end|>"
IM_START = "<|im_start|>"
_FALLBACK_IDS = {ENDOFTEXT: 248044, IM_END: 248046, IM_START: 248045}




class HostTokenizer:
    """A model's tokenizer on the host (loaded from the bundle's tokenizer.json).

    ``encode`` adds no special tokens (no BOS; a raw completion prompt is sent as written) but does
    parse special tokens written in the text, so ``"<|im_start|>user"`` is one special id followed by
    text, as HF's chat templates expect.
    """

    def __init__(self, tokenizer: Tokenizer, *, name: str = "tokenizer") -> None:
        self._tk = tokenizer
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # id -> raw bytes, only for byte-level vocabularies (None selects the window fallback)
        self._id_bytes: list[bytes] | None = (
            self._byte_table() if isinstance(tokenizer.decoder, decoders.ByteLevel) else None
        )

    @classmethod
    def from_file(cls, path: str | Path) -> HostTokenizer:
        """Load a tokenizer.json (blocking: seconds for a large vocabulary, run it in a thread)."""
        host = cls(Tokenizer.from_file(str(path)), name=Path(path).name)
        settle_heap()  # the parse's peak out of the RSS (server/memory.py)
        return host

    def _byte_table(self) -> list[bytes] | None:
        added = {i: tok.content for i, tok in self._tk.get_added_tokens_decoder().items()}
        table: list[bytes] = []
        to_byte = byte_decoder()
        for i in range(self.vocab_size):
            if i in added:
                table.append(added[i].encode("utf-8"))
                continue
            piece = self._tk.id_to_token(i)
            if piece is None:  # a hole in the id space decodes to nothing, as tokenizers does
                table.append(b"")
                continue
            try:
                table.append(bytes(to_byte[c] for c in piece))
            except KeyError:
                logger.warning("%s: token %d is not byte-level; using the window detokenizer", self.name, i)
                return None
        return table

    # -- text <-> ids ---------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return list(self._tk.encode(text, add_special_tokens=False).ids)

    def _encode_releasing_gil(self, text: str) -> list[int]:
        # tokenizers' ``encode`` holds the GIL for its whole run (a worker thread would still stop
        # the event loop); ``encode_batch`` releases it. Same ids: one text, no batch padding.
        return list(self._tk.encode_batch([text], add_special_tokens=False)[0].ids)

    async def encode_async(self, text: str) -> list[int]:
        """``encode``, in a worker thread that releases the GIL for long texts (1 MB takes ~1.5 s),
        so the event loop keeps serving other requests meanwhile."""
        if len(text) <= _THREAD_ENCODE_CHARS:
            return self.encode(text)
        return await anyio.to_thread.run_sync(self._encode_releasing_gil, text)

    def min_tokens(self, text: str) -> int:
        """A lower bound of ``len(encode(text))`` computed without tokenizing: a prompt whose bound
        exceeds the context is rejected at once, however large (a 1 MB prompt costs ~1 ms)."""
        return math.ceil(len(text.encode("utf-8")) / (_NFC_SHRINK_BOUND * self.max_token_bytes))

    def check_may_fit(self, text: str, max_context: int, *, param: str = "prompt") -> None:
        """Refuse at once (:class:`ContextLengthExceeded`, without tokenizing) a text whose ``min_tokens``
        already exceed ``max_context``: the pre-check before encoding a request's text."""
        at_least = self.min_tokens(text)
        if at_least > max_context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {max_context} tokens. However, your prompt "
                f"({len(text.encode('utf-8'))} bytes) is at least {at_least} tokens. Please reduce your prompt.",
                param=param,
            )

    def decode(self, ids: Sequence[int]) -> str:
        if self._id_bytes is not None:
            return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        return self._tk.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (byte-level vocabularies); unknown ids decode to nothing."""
        table = self._id_bytes
        if table is None:
            return self._tk.decode([token_id], skip_special_tokens=False).encode("utf-8")
        return table[token_id] if 0 <= token_id < len(table) else b""

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def special_id(self, token: str) -> int:
        """Id of a named special token (``ENDOFTEXT``, ``IM_END``, ``IM_START``), falling back to Qwen3.5's
        ids."""
        found = self._tk.token_to_id(token)
        return found if found is not None else _FALLBACK_IDS[token]

    @cached_property
    def max_token_bytes(self) -> int:
        """Longest token in UTF-8 bytes (128 for Qwen3.5): see ``min_tokens``."""
        if self._id_bytes is not None:
            return max(len(b) for b in self._id_bytes)
        return max(len(t.encode("utf-8")) for t in self._tk.get_vocab(with_added_tokens=True))

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Ids in, text out, one call per ``tok`` event; never emits half a UTF-8 character.

    ``feed(ids)`` returns the text that became complete with these ids ("" while a character is still
    open). ``flush()`` at the end releases whatever is left (an unfinished character becomes U+FFFD,
    like ``decode``).
    """

    def __init__(self, tokenizer: HostTokenizer) -> None:
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # fallback state (non-byte-level tokenizers only)
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def feed(self, ids: Sequence[int]) -> str:
        if self._tok._id_bytes is not None:
            table = self._tok._id_bytes
            n = len(table)
            return self._utf8.decode(b"".join(table[i] if 0 <= i < n else b"" for i in ids))
        return self._feed_window(ids)

    def flush(self) -> str:
        if self._tok._id_bytes is not None:
            return self._utf8.decode(b"", final=True)
        if self._read >= len(self._ids):
            return ""
        prefix = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full[len(prefix) :]

    def _feed_window(self, ids: Sequence[int]) -> str:
        # vLLM's detokenize_incrementally: decode [prefix, end) against [prefix, read) so that
        # context-dependent decoders (leading-space handling) see the token before the new ones.
        self._ids.extend(ids)
        prefix = self._tok.decode(self._ids[self._prefix : self._read])
        full = self._tok.decode(self._ids[self._prefix :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""  # a character is still open
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(prefix) :]
