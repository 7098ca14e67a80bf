"""The assistant's reply, parsed as it streams: reasoning, content and tool calls.

Generated text goes through the :class:`~server.serving.chat.reasoning.ReasoningSplitter` (think
block -> reasoning) and, when the request's tools are parsed, the content goes through the
:class:`~server.serving.chat.tools.ToolCallParser`. Out come :data:`Piece` lists, adjacent pieces
of one kind merged (one chunk per kind per text delta, not one per character).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.serving.chat.reasoning import ReasoningSplitter
from server.serving.chat.tools import ArgumentsDelta, CallStarted, Text, ToolCall, ToolCallParser, ToolPlan


@dataclass(slots=True)
class Reasoning:
    text: str


Piece = Reasoning | Text | CallStarted | ArgumentsDelta


class ReplyParser:
    """``feed(text)`` / ``finish()`` -> pieces; ``calls`` and the accumulated texts at the end.

    ``thinking``: the prompt ends inside an open think block. ``parallel_tool_calls`` False keeps
    only the first call (OpenAI: "at most one").
    """

    def __init__(self, plan: ToolPlan, *, thinking: bool, parallel_tool_calls: bool = True) -> None:
        self._splitter = ReasoningSplitter(thinking=thinking)
        self._tools = ToolCallParser(plan.schemas, prefill=plan.prefill) if plan.parse else None
        self._max_calls = None if parallel_tool_calls else 1
        self.reasoning = ""
        self.content = ""

    @property
    def calls(self) -> list[ToolCall]:
        calls = self._tools.calls if self._tools is not None else []
        return calls[: self._max_calls] if self._max_calls is not None else calls

    def feed(self, text: str) -> list[Piece]:
        split = self._splitter.feed(text)
        return self._pieces(split.reasoning, split.content, final=False)

    def finish(self) -> list[Piece]:
        split = self._splitter.finish()
        return self._pieces(split.reasoning, split.content, final=True)

    def _pieces(self, reasoning: str, content: str, *, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        if reasoning:
            pieces.append(Reasoning(reasoning))
        if self._tools is None:
            if content:
                pieces.append(Text(content))
        else:
            pieces += self._tools.feed(content) if content else []
            if final:
                pieces += self._tools.finish()
        kept = [p for p in pieces if self._keep(p)]
        for p in kept:
            if isinstance(p, Reasoning):
                self.reasoning += p.text
            elif isinstance(p, Text):
                self.content += p.text
        return _merge(kept)

    def _keep(self, piece: Piece) -> bool:
        if self._max_calls is None or not isinstance(piece, (CallStarted, ArgumentsDelta)):
            return True
        return piece.index < self._max_calls


def _merge(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        last = out[-1] if out else None
        if isinstance(p, Reasoning) and isinstance(last, Reasoning):
            out[-1] = Reasoning(last.text + p.text)
        elif isinstance(p, Text) and isinstance(last, Text):
            out[-1] = Text(last.text + p.text)
        elif isinstance(p, ArgumentsDelta) and isinstance(last, ArgumentsDelta) and p.index == last.index:
            out[-1] = ArgumentsDelta(p.index, last.fragment + p.fragment)
        else:
            out.append(p)
    return out
