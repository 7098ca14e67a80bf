"""Stop strings, matched on the text stream whatever the token boundaries.

A stop string can span several tokens ("\\n\\nUser:" may arrive as "\\n", "\\nUser", ":"), so text
that could still turn out to be the start of a stop string is held back until it cannot (pain point 3
of openai-servers.md: vLLM #3574, TGI #1254). The output is cut exactly at the first match; the stop
string itself is not emitted (OpenAI semantics).

:class:`TokenStops` does the same over a token stream and counts the completion tokens: every token,
or, once a stop string matched, the tokens up to and including the one in which it completes (vLLM's
count; docs/api.md "Usage"). The count depends on the tokens only, never on how they were batched, so
a stream and a non-streamed request (whose consumers fall behind the phone differently) agree.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence


class StopMatcher:
    """Feed text pieces in order; get back the text that is safe to show.

    ``feed(piece)`` returns ``(safe_text, matched)``. Once ``matched`` is a stop string, ``safe_text``
    ends right before it and the matcher is finished. The match is the earliest in the text (at equal
    positions the longest stop): a stop found in the text waits while a longer stop that starts
    earlier could still complete (stops ``["b", ":b:"]`` on ``":b" + ":"`` cut at the first ``:``).
    ``flush()`` at the end of generation settles what is held back: ``(text, matched)``.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        # empty strings would match everywhere; OpenAI-compatible servers ignore them
        self.stops = sorted({s for s in stops if s}, key=len, reverse=True)
        self._max_len = max((len(s) for s in self.stops), default=0)
        # a held tail ends with a character of some stop string: a cheap test for the common case
        self._chars = frozenset("".join(s[:-1] for s in self.stops))
        self._buf = ""
        self._floor = 0  # no match may end within this many leading characters of _buf (feed_unsearched)
        self.matched: str | None = None

    @property
    def held(self) -> str:
        """Text received but not yet released (a possible stop-string start)."""
        return self._buf

    def feed(self, piece: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", self.matched
        if not self.stops:
            return piece, None
        buf = self._buf + piece
        at, which = self._first_match(buf)
        # the earliest position where a stop could still begin, completed by text not seen yet
        pending = self._first_partial(buf, before=len(buf) if which is None else at)
        if pending is None and which is not None:
            self._buf, self._floor = "", 0
            self.matched = which
            return buf[:at], which
        cut = len(buf) if pending is None else pending
        self._buf, self._floor = buf[cut:], max(0, self._floor - cut)
        return buf[:cut], None

    def feed_unsearched(self, piece: str) -> str:
        """Text in which no stop may end, though one may start in it and end in text fed later (vLLM's
        ``min_tokens``); the text safe to show."""
        if self.matched is not None:
            return ""
        if not self.stops:
            return piece
        buf = self._buf + piece
        pending = self._first_partial(buf, before=len(buf))
        cut = len(buf) if pending is None else pending
        self._buf, self._floor = buf[cut:], len(buf) - cut
        return buf[:cut]

    def flush(self) -> tuple[str, str | None]:
        """The end of the text: release what was held back, cut at a stop found in it."""
        buf, self._buf = self._buf, ""
        if self.matched is not None:
            return "", self.matched
        at, which = self._first_match(buf)
        self._floor = 0
        if which is None:
            return buf, None
        self.matched = which
        return buf[:at], which

    def _first_match(self, buf: str) -> tuple[int, str | None]:
        at, which = -1, None
        for stop in self.stops:  # longest first, so ties keep the longest
            i = buf.find(stop, max(0, self._floor - len(stop) + 1))  # ending past the floor
            if i != -1 and (which is None or i < at):
                at, which = i, stop
        return at, which

    def _first_partial(self, buf: str, *, before: int) -> int | None:
        """Smallest j < before such that buf[j:] is a proper prefix of some (longer) stop string."""
        if not buf or buf[-1] not in self._chars:
            return None
        for j in range(max(0, len(buf) - self._max_len + 1), before):
            tail = buf[j:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self.stops):
                return j
        return None


class TokenStops:
    """Stop strings over generated tokens: text that is safe to show, and the tokens that count.

    ``feed(texts)`` takes one batch of tokens, the text each token completed, in order (``""`` for a
    token that ends inside a UTF-8 character); ``flush(tail)`` ends the generation (``tail``: what the
    detokenizer still held, part of the last token). Both return ``(safe_text, matched)`` as
    :class:`StopMatcher` does. ``tokens`` is the completion token count; ``stop_end`` the offset in the
    generated text right after the matched stop string.

    With ``min_tokens``, no stop may end in the text of the first ``min_tokens`` tokens, though one may
    start there and end in a later token (vLLM's v1 detokenizer: stop strings are looked for once more
    than ``min_tokens`` tokens are out, in the text the new tokens added, a match reaching back into
    the earlier text by up to its length).

    The text is cut at the earliest match. Of the stops that start there, the shortest completes first,
    so it is the one reported and counted: ``[":", "::"]`` on ``":"`` ``":"`` is ``":"`` after one
    token, whether the two tokens came one by one or together.
    """

    def __init__(self, stops: Iterable[str], *, min_tokens: int = 0) -> None:
        self._matcher = StopMatcher(stops)
        self._min_tokens = min_tokens  # no stop ends in the text of the first ones (vLLM's min_tokens)
        self._parts: list[str] = []
        self._ends: list[int] = []  # text length at the end of each token
        self._length = 0
        self._released = 0
        self.matched: str | None = None
        self.stop_end: int | None = None
        self._count = 0

    @property
    def tokens(self) -> int:
        return self._count if self.matched is not None else len(self._ends)

    @property
    def text(self) -> str:
        """All the text fed so far (past the stop too)."""
        return "".join(self._parts)

    def feed(self, texts: Sequence[str]) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", self.matched
        early = "".join(texts[: max(0, self._min_tokens - len(self._ends))])
        for t in texts:
            self._length += len(t)
            self._ends.append(self._length)
        self._parts.extend(texts)
        shown = self._matcher.feed_unsearched(early) if early else ""
        self._released += len(shown)
        safe, matched = self._settle(*self._matcher.feed("".join(texts)[len(early):]))
        return shown + safe, matched

    def flush(self, tail: str = "") -> tuple[str, str | None]:
        if self.matched is not None:
            return "", self.matched
        safe, matched = "", None
        if tail:
            self._length += len(tail)
            if self._ends:
                self._ends[-1] = self._length
            self._parts.append(tail)
            if len(self._ends) <= self._min_tokens:  # part of a token within min_tokens
                safe = self._matcher.feed_unsearched(tail)
            else:
                safe, matched = self._matcher.feed(tail)
        if matched is None:
            rest, matched = self._matcher.flush()
            safe += rest
        return self._settle(safe, matched)

    def _length_of(self, tokens: int) -> int:
        """The length of the text of the first ``tokens`` tokens."""
        return self._ends[min(tokens, len(self._ends)) - 1] if tokens and self._ends else 0

    def _settle(self, safe: str, matched: str | None) -> tuple[str, str | None]:
        self._released += len(safe)
        if matched is None:
            return safe, None
        at = self._released  # the text released is exactly the text before the match
        after = self.text[at:]
        floor = self._length_of(self._min_tokens) - at  # a stop ends past the first min_tokens' text
        self.matched = min((s for s in self._matcher.stops if after.startswith(s) and len(s) > floor), key=len)
        self.stop_end = at + len(self.matched)
        self._count = min(bisect.bisect_left(self._ends, self.stop_end) + 1, len(self._ends))
        return safe, self.matched
