"""Stop strings, matched on the text stream whatever the token boundaries.

A stop string can span several tokens ("\\n\\nUser:" may arrive as "\\n", "\\nUser", ":"), so text
that could still turn out to be the start of a stop string is held back until it cannot (pain point 3
of openai-servers.md: vLLM #3574, TGI #1254). The output is cut exactly at the first match; the stop
string itself is not emitted (OpenAI semantics).
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """Feed text pieces in order; get back the text that is safe to show.

    ``feed(piece)`` returns ``(safe_text, matched)``: ``matched`` is the stop string found (the
    earliest match in the text; at equal positions the longest stop), and then ``safe_text`` is all
    the text before it and the matcher is finished. ``flush()`` releases the held-back tail when the
    generation ended without a match.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        # empty strings would match everywhere; OpenAI-compatible servers ignore them
        self.stops = sorted({s for s in stops if s}, key=len, reverse=True)
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        # a held tail ends with a character of some stop string: a cheap test for the common case
        self._chars = frozenset("".join(s[:-1] for s in self.stops))
        self._buf = ""
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
        # Only the held tail plus the new piece can contain a match that was not there before.
        at, which = -1, None
        for stop in self.stops:  # longest first, so ties keep the longest
            i = buf.find(stop)
            if i != -1 and (at == -1 or i < at):
                at, which = i, stop
        if which is not None:
            self._buf = ""
            self.matched = which
            return buf[:at], which
        hold = self._partial_suffix(buf)
        self._buf = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return "" if self.matched is not None else out

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        if not buf or buf[-1] not in self._chars:
            return 0
        for n in range(min(self._max_hold, len(buf)), 0, -1):
            tail = buf[-n:]
            if any(stop.startswith(tail) for stop in self.stops if len(stop) > n):
                return n
        return 0
