"""A chat that outgrows the context, with ``context_overflow: drop-oldest`` (docs/chat.md, "Context
overflow"): drop whole oldest turns after the system message, enough at once that the kept part
stays the same for the turns that follow, so that the phones keep reusing its state.

A *turn* is a user message and everything up to the next one (the assistant's replies, its tool
calls and their results stay together); messages between the system message and the first user
message belong to the first turn. A user message that only wraps tool results
(``<tool_response>...</tool_response>``, as the template tells them apart) does not start a turn.

Where to cut. Dropping just enough for each request would move the cut at every turn, and with it
the start of the prompt: nothing the phone holds would be reused. So when a conversation does not
fit, turns are dropped down to half the context (or less, when the requested completion needs more
room), and later requests of that conversation cut at the same place for as long as what follows it
fits. The server keeps nothing between requests: :func:`replay_cut` finds the cut again by replaying
the conversation's turns in order, as its earlier requests came, from the token count of each turn
(found on the ids of the whole conversation rendered once, :func:`turn_positions`).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

DROPPED_HEADER = "X-QHX-Context-Dropped"


def dropped_header(dropped: int) -> dict[str, str]:
    """The response header saying how many messages were dropped (none when none were)."""
    return {DROPPED_HEADER: str(dropped)} if dropped else {}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(getattr(part, "text", None) or "" for part in content)
    return ""


def _wraps_tool_results(text: str) -> bool:
    text = text.strip()
    return text.startswith("<tool_response>") and text.endswith("</tool_response>")


@dataclass(frozen=True, slots=True)
class Turns:
    """A conversation's messages as a kept head (the system message, if first) and turns."""

    head: int  # messages before the first turn: 1 with a system (or developer) message first, else 0
    starts: tuple[int, ...]  # index of each turn's first message

    @classmethod
    def of(cls, messages: Sequence[Any]) -> Turns:
        """``messages``: objects with ``role`` and ``content`` (the request's messages)."""
        head = 1 if messages and messages[0].role in ("system", "developer") else 0
        if len(messages) <= head:
            return cls(head, ())
        later = [i for i in range(head + 1, len(messages))
                 if messages[i].role == "user" and not _wraps_tool_results(_text(messages[i].content))]
        return cls(head, (head, *later))

    def __len__(self) -> int:
        return len(self.starts)

    def dropped(self, first: int) -> int:
        """Messages dropped when the turns before turn ``first`` are."""
        return self.starts[first] - self.head


@dataclass(frozen=True, slots=True)
class Positions:
    """Where, in the ids of the whole conversation rendered with its generation prompt, each turn
    starts (``turn[t]``), where its first message ends (``opening[t]``) and where the history ends
    (``end``: the generation prompt starts; ``total`` is the length of the ids)."""

    turn: tuple[int, ...]
    opening: tuple[int, ...]
    end: int
    total: int

    def size(self, first: int, last: int, *, whole: bool) -> int:
        """Prompt tokens of the conversation cut before turn ``first`` and ending with turn ``last``
        (``whole``) or with its first message (as the request that opened it), generation prompt
        included."""
        stop = (self.turn[last + 1] if last + 1 < len(self.turn) else self.end) if whole else self.opening[last]
        return self.turn[0] + (stop - self.turn[first]) + (self.total - self.end)


def turn_positions(
    ids: Sequence[int], im_start: int, messages: Sequence[Any], turns: Turns, *, system_block: bool,
) -> Positions | None:
    """The turns' positions in ``ids`` (the whole conversation, rendered with its generation prompt),
    read from the ``<|im_start|>`` that opens each message in Qwen's chat format: one per user and
    assistant message, one per run of tool messages (they share a user turn), one for the system
    block (``system_block``: the prompt opens with one, from a system message or tools) and one for
    the generation prompt. None when the ids do not hold exactly those (another format, or a
    ``<|im_start|>`` written in a message's text)."""
    starts = [i for i, token in enumerate(ids) if token == im_start]
    opens = [m.role != "tool" or i == 0 or messages[i - 1].role != "tool" for i, m in enumerate(messages)]
    expected = int(system_block) + sum(opens[turns.head:]) + 1
    if len(starts) != expected or not len(turns):
        return None
    at: list[int | None] = [None] * len(messages)
    k = int(system_block)
    for i in range(turns.head, len(messages)):
        if opens[i]:
            at[i], k = starts[k], k + 1
    end = starts[-1]

    def next_start(i: int) -> int:  # where the first message from i on that opens a turn of its own starts
        return next((p for p in at[i:] if p is not None), end)

    turn = tuple(next_start(s) for s in turns.starts)
    opening = tuple(next_start(s + 1) for s in turns.starts)
    return Positions(turn, opening, end, len(ids))


def replay_cut(positions: Positions, fits: Callable[[int], bool], target: int) -> int:
    """The first turn to keep: the conversation's requests replayed in order (each turn's opening
    message, the last turn whole), dropping, whenever one does not ``fits``, the fewest oldest turns
    that bring it to ``target`` tokens or under (all but its last turn when none do)."""
    first = 0
    count = len(positions.turn)
    for last in range(count):
        whole = last == count - 1

        def size(cut: int, last: int = last, whole: bool = whole) -> int:
            return positions.size(cut, last, whole=whole)

        if fits(size(first)):
            continue
        # sizes shrink as the cut moves later: the first cut in (first, last] at or under target
        cuts = range(first + 1, last + 1)
        found = bisect.bisect_left(cuts, True, key=lambda cut: size(cut) <= target)
        first = cuts[found] if found < len(cuts) else last
    return first
