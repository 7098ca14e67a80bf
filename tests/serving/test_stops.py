"""StopMatcher: stop strings across arbitrary splits of the text, never leaked. TokenStops: the same
over tokens, and the completion token count (docs/api.md "Usage"), whatever the batching."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from server.serving.stops import StopMatcher, TokenStops
from server.serving.tokens import HostTokenizer

SETTINGS = settings(max_examples=400, deadline=None)
ALPHABET = st.sampled_from(list("ab\n:Ué世🎉 "))


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], str | None]:
    m = StopMatcher(stops)
    out: list[str] = []
    for piece in pieces:
        safe, matched = m.feed(piece)
        out.append(safe)
        if matched is not None:
            return out, matched
    tail, matched = m.flush()
    out.append(tail)
    return out, matched


def expected(text: str, stops: list[str]) -> tuple[str, str | None]:
    hits = [(text.find(s), -len(s), s) for s in stops if s and s in text]
    if not hits:
        return text, None
    at, _, stop = min(hits)
    return text[:at], stop


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in itertools.pairwise(points)]


@SETTINGS
@given(
    text=st.text(ALPHABET, max_size=40),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 1000), max_size=20),
)
def test_output_is_exactly_the_text_before_the_first_match(text: str, stops: list[str], cuts: list[int]) -> None:
    pieces, matched = run(stops, split(text, cuts))
    want_text, want_stop = expected(text, stops)
    assert "".join(pieces) == want_text
    # at the same position a shorter stop can complete before the longer one arrives (":" before
    # "::"): which one is reported may differ, the cut may not
    assert (matched is None) == (want_stop is None)
    if matched is not None:
        assert text[len(want_text) :].startswith(matched)


def test_a_stop_inside_a_longer_pending_stop_waits_for_it() -> None:
    m = StopMatcher(["b", ":b:"])
    assert m.feed("::b") == (":", None)  # ":b" may still become ":b:", which starts earlier
    assert m.feed(":") == ("", ":b:")
    m = StopMatcher(["b", ":b:"])
    assert m.feed("::b") == (":", None)
    assert m.feed("x") == (":", "b")  # it did not: the "b" match stands
    m = StopMatcher(["b", ":b:"])
    m.feed("::b")
    assert m.flush() == (":", "b")  # the end of the text settles it too


@SETTINGS
@given(
    before=st.text(ALPHABET, max_size=20),
    stop=st.text(ALPHABET, min_size=2, max_size=6),
    after=st.text(ALPHABET, max_size=10),
    cuts=st.lists(st.integers(0, 1000), max_size=20),
)
def test_nothing_emitted_is_ever_part_of_the_match(
    before: str, stop: str, after: str, cuts: list[int]
) -> None:
    text = before + stop + after
    cut_at = text.find(stop)
    emitted = ""
    m = StopMatcher([stop])
    for piece in split(text, cuts):
        safe, matched = m.feed(piece)
        emitted += safe
        assert len(emitted) <= cut_at  # never a character of the stop string, not even for a while
        if matched:
            break
    assert emitted == text[:cut_at]


@settings(max_examples=150, deadline=None)
@given(
    before=st.text(st.sampled_from(list("Hello wrld,\n世界🎉:U")), max_size=30),
    stop=st.sampled_from(["\n\nUser:", "世界", "🎉🎉", "END", "lo w"]),
    after=st.text(max_size=10),
)
def test_stop_strings_spanning_real_qwen_tokens(
    qwen_tokenizer: HostTokenizer, before: str, stop: str, after: str
) -> None:
    text = before + stop + after
    ids = qwen_tokenizer.encode(text)
    detok = qwen_tokenizer.detokenizer()
    m = StopMatcher([stop, "never-seen"])
    out, matched = "", None
    for i in ids:
        safe, matched = m.feed(detok.feed([i]))
        out += safe
        if matched:
            break
    if not matched:
        safe, matched = m.feed(detok.flush())
        out += safe
        if not matched:
            tail, matched = m.flush()
            out += tail
    decoded = qwen_tokenizer.decode(ids)
    want, want_stop = expected(decoded, [stop, "never-seen"])
    assert out == want and matched == want_stop
    assert "\ufffd" not in out


def test_text_held_back_is_released_when_it_stops_being_a_prefix() -> None:
    m = StopMatcher(["\n\nUser:"])
    assert m.feed("Hi\n") == ("Hi", None)
    assert m.held == "\n"
    assert m.feed("\nUs") == ("", None)
    assert m.feed("ed") == ("\n\nUsed", None)


def test_no_stops_passes_everything_through() -> None:
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", None)
    assert m.flush() == ("", None)


def test_empty_stop_strings_are_ignored() -> None:
    assert StopMatcher(["", "x"]).stops == ["x"]


def test_earliest_match_wins_and_ties_take_the_longest() -> None:
    assert StopMatcher(["cd", "b"]).feed("abcd") == ("a", "b")
    assert StopMatcher(["ab", "abc"]).feed("xabcd") == ("x", "abc")


# --- TokenStops: the count of completion tokens -------------------------------------------------

TOKEN_TEXT = st.text(ALPHABET, max_size=3)  # "" too: a token that ends inside a UTF-8 character


def count_reference(tokens: list[str], stops: list[str]) -> tuple[str, int]:
    """(text, count) by the rule, computed on the whole text: cut at the earliest match; the count is
    the index of the token in which the first stop starting there completes, + 1 (all tokens if none)."""
    text = "".join(tokens)
    want, stop = expected(text, stops)
    if stop is None:
        return text, len(tokens)
    end = len(want) + min(len(s) for s in stops if s and text[len(want):].startswith(s))
    seen = 0
    for k, t in enumerate(tokens):
        seen += len(t)
        if seen >= end:
            return want, k + 1
    raise AssertionError("the stop is in the text")


def scan_batches(stops: list[str], tokens: list[str], cuts: list[int], tail: str = "",
                 min_tokens: int = 0) -> tuple[str, int, TokenStops]:
    """Feed ``tokens`` in batches cut at ``cuts`` (token indices), as the engine does."""
    points = sorted({c % (len(tokens) + 1) for c in cuts} | {0, len(tokens)})
    scan = TokenStops(stops, min_tokens=min_tokens)
    out = ""
    for a, b in itertools.pairwise(points):
        safe, matched = scan.feed(tokens[a:b])
        out += safe
        if matched is not None:
            return out, scan.tokens, scan
    safe, _ = scan.flush(tail)
    return out + safe, scan.tokens, scan


@SETTINGS
@given(
    tokens=st.lists(TOKEN_TEXT, max_size=30),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=5), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 1000), max_size=10),
)
def test_token_count_ends_at_the_token_that_completes_the_stop_whatever_the_batches(
    tokens: list[str], stops: list[str], cuts: list[int]
) -> None:
    want_text, want_count = count_reference(tokens, stops)
    streamed = scan_batches(stops, tokens, list(range(len(tokens))))  # one token per batch: a fast reader
    together = scan_batches(stops, tokens, [])  # all at once: a reader that fell behind
    batched = scan_batches(stops, tokens, cuts)
    for out, count, scan in (streamed, together, batched):
        assert out == want_text
        assert count == want_count
        assert (scan.matched is None) == (expected("".join(tokens), stops)[1] is None)
    assert streamed[2].matched == together[2].matched == batched[2].matched  # the stop that completed first


def test_tokens_after_the_stop_are_not_counted() -> None:
    scan = TokenStops(["User:"])
    assert scan.feed(["User", ":", " more", " and", " more"]) == ("", "User:")
    assert scan.tokens == 2 and scan.stop_end == 5


def test_of_two_stops_at_the_cut_the_shorter_completes_first() -> None:
    scan = TokenStops([":", "::"])
    assert scan.feed([":", ":"]) == ("", ":")
    assert scan.tokens == 1


def test_the_detokenizer_tail_belongs_to_the_last_token() -> None:
    scan = TokenStops(["\ufffd"])
    assert scan.feed(["a", ""]) == ("a", None)
    assert scan.flush("\ufffd") == ("", "\ufffd")
    assert scan.tokens == 2
    scan = TokenStops(["x"])
    scan.feed(["a", "b"])
    assert scan.flush() == ("", None) and scan.tokens == 2 and scan.stop_end is None


def min_tokens_reference(tokens: list[str], stops: list[str], min_tokens: int) -> tuple[str, int]:
    """vLLM's rule (v1 detokenizer): stop strings are looked for once more than ``min_tokens`` tokens are
    out, in the text those later tokens added: a match must *end* past the first ``min_tokens`` tokens'
    text, though it may start in it. Then as without: the earliest such match, counted to its token."""
    text = "".join(tokens)
    floor = len("".join(tokens[:min_tokens]))
    hits = []
    for stop in stops:
        at = text.find(stop, max(0, floor - len(stop) + 1))
        if at != -1:
            hits.append((at, len(stop)))
    if not hits:
        return text, len(tokens)
    at, length = min(hits)
    end, seen = at + length, 0
    for k, t in enumerate(tokens):
        seen += len(t)
        if seen >= end:
            return text[:at], k + 1
    raise AssertionError("the stop is in the text")


@st.composite
def min_tokens_cases(draw: st.DrawFn) -> tuple[list[str], list[str], int]:
    """Tokens, min_tokens within them (or past), and stops, some cut from the text around the point
    where the first min_tokens tokens end (the matches that tell the rule apart are rare otherwise)."""
    tokens = draw(st.lists(TOKEN_TEXT, max_size=30))
    min_tokens = draw(st.integers(0, len(tokens) + 2))
    text, floor = "".join(tokens), len("".join(tokens[:min_tokens]))
    around = st.tuples(st.integers(max(0, floor - 4), floor), st.integers(1, 5)).map(lambda p: text[p[0]:p[0] + p[1]])
    stops = draw(st.lists(st.one_of(st.text(ALPHABET, min_size=1, max_size=5), around.filter(bool)),
                          min_size=1, max_size=4))
    return tokens, stops, min_tokens


@SETTINGS
@given(case=min_tokens_cases(), cuts=st.lists(st.integers(0, 1000), max_size=10))
def test_min_tokens_keeps_out_stops_that_end_in_the_first_tokens_whatever_the_batches(
    case: tuple[list[str], list[str], int], cuts: list[int]
) -> None:
    tokens, stops, min_tokens = case
    want_text, want_count = min_tokens_reference(tokens, stops, min_tokens)
    for cut in (list(range(len(tokens))), [], cuts):
        out, count, _scan = scan_batches(stops, tokens, cut, min_tokens=min_tokens)
        assert (out, count) == (want_text, want_count)


def test_a_stop_may_start_in_the_first_min_tokens_and_end_after_them() -> None:
    """As vLLM: "bc" ends in the second token, so it stops there, cut where it starts. The text of the
    first min_tokens was shown unsearched, and a stop across the boundary was never found."""
    out, count, scan = scan_batches(["bc"], ["ab", "cd"], [1], min_tokens=1)
    assert (out, count, scan.matched) == ("a", 2, "bc")
    out, count, scan = scan_batches(["ab"], ["ab", "cd"], [1], min_tokens=1)  # ends in the first: not a stop
    assert (out, count, scan.matched) == ("abcd", 2, None)
