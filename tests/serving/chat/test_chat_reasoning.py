"""reasoning_content / content splitting, whole and in random pieces."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.serving.chat.reasoning import ReasoningSplitter, partial_suffix


@st.composite
def chunked(draw: st.DrawFn, text: str) -> list[str]:
    """``text`` cut into random pieces, as a stream delivers it."""
    cuts = draw(st.sets(st.integers(min_value=1, max_value=max(1, len(text) - 1)), max_size=len(text)))
    bounds = [0, *sorted(c for c in cuts if c < len(text)), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def split(pieces: list[str], *, thinking: bool) -> tuple[str, str, list[str]]:
    """(reasoning, content, content pieces as streamed)."""
    splitter = ReasoningSplitter(thinking=thinking)
    reasoning, content, streamed = "", "", []
    for piece in pieces:
        out = splitter.feed(piece)
        reasoning += out.reasoning
        content += out.content
        streamed.append(out.content)
    out = splitter.finish()
    return reasoning + out.reasoning, content + out.content, [*streamed, out.content]


CASES = [
    # (generated text, thinking, reasoning, content)
    ("Okay, think.\n</think>\n\nThe answer.", True, "Okay, think.", "The answer."),
    ("\nOkay.\n\n</think>\n\nA", True, "Okay.", "A"),
    ("still thinking when cut", True, "still thinking when cut", ""),
    ("still thinking\n\n", True, "still thinking", ""),
    ("<think>\nrepeated tag\n</think>\n\nA", True, "repeated tag", "A"),
    ("Just the answer.", False, "", "Just the answer."),
    ("<think>\nunasked\n</think>\n\nA", False, "unasked", "A"),
    ("\n<think>r</think>A", False, "r", "A"),
    ("A <think> in the middle</think>", False, "", "A <think> in the middle</think>"),
    ("<thi", False, "", "<thi"),
    ("", False, "", ""),
    ("", True, "", ""),
    ("r</think>", True, "r", ""),
    ("r </thinking> x", True, "r </thinking> x", ""),
    ("a</think>b</think>c", True, "a", "b</think>c"),
]


@pytest.mark.parametrize(("text", "thinking", "reasoning", "content"), CASES)
def test_split_whole(text: str, thinking: bool, reasoning: str, content: str) -> None:
    got_reasoning, got_content, _ = split([text], thinking=thinking)
    assert (got_reasoning, got_content) == (reasoning, content)


@pytest.mark.parametrize(("text", "thinking", "reasoning", "content"), CASES)
@settings(max_examples=30)
@given(data=st.data())
def test_split_any_chunking_matches_whole(
    text: str, thinking: bool, reasoning: str, content: str, data: st.DataObject
) -> None:
    pieces = data.draw(chunked(text))
    got_reasoning, got_content, _streamed = split(pieces, thinking=thinking)
    assert (got_reasoning, got_content) == (reasoning, content)


@given(
    before=st.text(alphabet="ab<>/\nthink ", max_size=30),
    after=st.text(alphabet="ab<>/\nthink ", max_size=30),
    data=st.data(),
)
def test_streaming_never_leaks_a_partial_close_tag(before: str, after: str, data: st.DataObject) -> None:
    text = before + "</think>" + after
    reasoning, content, streamed = split(data.draw(chunked(text)), thinking=True)
    end = text.index("</think>")
    assert content == text[end + len("</think>"):].lstrip("\n")
    assert "".join(streamed) == content
    assert (reasoning, content) == split([text], thinking=True)[:2]
    assert "</think>" not in reasoning


def test_reasoning_flag() -> None:
    off = ReasoningSplitter(thinking=False)
    off.feed("plain")
    assert not off.saw_reasoning
    opened = ReasoningSplitter(thinking=False)
    opened.feed("<think>x</think>y")
    assert opened.saw_reasoning


def test_partial_suffix() -> None:
    assert partial_suffix("abc</th", "</think>") == 4
    assert partial_suffix("abc", "</think>") == 0
    assert partial_suffix("</think>", "</think>") == 0  # a whole tag is not a partial one
    assert partial_suffix("<", "<tool_call>") == 1
