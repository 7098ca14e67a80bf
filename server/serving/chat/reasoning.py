"""Split generated text into reasoning (inside ``<think>...</think>``) and content, incrementally.

Qwen3.5's template pre-fills the think block, so the opening tag is usually *in the prompt*, not in
the output (nosana PR #171, llama.cpp #24671):

* thinking on: the prompt ends with ``<think>\\n``; the output starts inside the block and goes
  ``reasoning\\n</think>\\n\\nanswer``. Without ``</think>`` (cut by max tokens) it is all reasoning.
* thinking off: the prompt ends with an empty block ``<think>\\n\\n</think>\\n\\n``; the output is
  content, unless the model opens a block of its own anyway (only recognised at the very start).

Newlines right inside the block and right after it are dropped, as the template drops them when the
turn is rendered back (``reasoning.strip('\\n')``, ``content.lstrip('\\n')``), so a client that
sends ``reasoning_content`` back gets the prompt the model saw.

Streaming never leaks part of a tag: text that could be the start of ``</think>`` (or, at the
start, of ``<think>``) is held back until the next piece decides it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(slots=True)
class Split:
    """What one piece of generated text contributed: reasoning first, then content."""

    reasoning: str = ""
    content: str = ""


class _State(enum.Enum):
    START = "start"  # thinking off, nothing decided yet: a think block may still open
    REASONING = "reasoning"
    AFTER_THINK = "after_think"  # just after </think>: drop newlines
    CONTENT = "content"


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (0 if none)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Feed generated text in pieces of any size; get back :class:`Split` pieces.

    ``thinking``: whether the prompt ended inside an open think block (``<think>\\n``).
    """

    def __init__(self, *, thinking: bool) -> None:
        self._state = _State.REASONING if thinking else _State.START
        self._buf = ""
        self._reasoning_started = False  # any reasoning text emitted yet (for leading newlines)
        self.saw_reasoning = thinking

    def feed(self, text: str) -> Split:
        self._buf += text
        out = Split()
        while self._step(out):
            pass
        return out

    def finish(self) -> Split:
        """Flush what was held back: the generation is over."""
        out = Split()
        buf, self._buf = self._buf, ""
        if self._state is _State.START:
            out.content = buf
        elif self._state is _State.REASONING:
            out.reasoning = self._reasoning_text(buf.rstrip("\n"))
        self._state = _State.CONTENT
        return out

    def _reasoning_text(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip("\n")
            if text:
                self._reasoning_started = True
        return text

    def _step(self, out: Split) -> bool:
        """Consume what can be decided from the buffer; True if the state changed (go again)."""
        buf = self._buf
        if self._state is _State.START:
            head = buf.lstrip()
            if not head or THINK_OPEN.startswith(head):
                return False  # whitespace or a partial "<think>": undecided
            if head.startswith(THINK_OPEN):
                self._buf = head[len(THINK_OPEN):]
                self._state = _State.REASONING
                self.saw_reasoning = True
                return True
            self._state = _State.CONTENT
            return True

        if self._state is _State.REASONING:
            if not self._reasoning_started:
                # a model may repeat the pre-filled opening tag: drop it
                head = buf.lstrip()
                if head and THINK_OPEN.startswith(head):
                    return False
                if head.startswith(THINK_OPEN):
                    self._buf = buf = head[len(THINK_OPEN):]
            end = buf.find(THINK_CLOSE)
            if end >= 0:
                out.reasoning += self._reasoning_text(buf[:end].rstrip("\n"))
                self._buf = buf[end + len(THINK_CLOSE):]
                self._state = _State.AFTER_THINK
                return True
            keep = partial_suffix(buf, THINK_CLOSE)
            ready = buf[: len(buf) - keep]
            emit = ready.rstrip("\n")  # trailing newlines may turn out to precede </think>
            out.reasoning += self._reasoning_text(emit)
            self._buf = buf[len(emit):]
            return False

        if self._state is _State.AFTER_THINK:
            rest = buf.lstrip("\n")
            self._buf = rest
            if not rest:
                return False
            self._state = _State.CONTENT
            return True

        out.content += buf
        self._buf = ""
        return False
