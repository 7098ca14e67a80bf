"""One-shot mode's text -> token ids, with the real Qwen3.5 tokenizer: however the CLI's output is cut
into pieces, the ids emitted are those of the whole text, and decode to exactly that text."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.backends.adb.retokenize import Retokenizer, decode, load_tokenizer
from server.sim.vocab import ensure_tokenizer_json

TOKENIZER = load_tokenizer(str(ensure_tokenizer_json()))

# what makes pre-tokens merge or split when more text comes: runs of spaces and newlines, contractions,
# combining marks, multi-byte characters, special tokens (whole, or cut anywhere)
PIECES = st.sampled_from([
    "<|im_end|>", "<|im_", "end|>", "<", "|", "<think>", "</think>", "<tool_call>", " ", "  ", "\n", "\n\n",
    "\r\n", "\t", " \n ", ".", ",", "!", "...", "--", "'s", "'", "don", "'t", "e\u0301", "\u0301", "é", "🙂",
    "👨‍👩‍👧", "日本", "語", "123", "4", "Hello", " world", "x", "\ufffd",
])
TEXTS = st.lists(
    st.one_of(PIECES, st.text(max_size=6), st.text(alphabet=" \n\r\t.,!?'sa1é\u0301<|>_", max_size=8)),
    max_size=25,
).map("".join)


def chunked(text: str, rnd: random.Random) -> list[str]:
    """``text`` cut at up to 8 random places (as stdout packets cut the CLI's output)."""
    cuts = sorted(rnd.sample(range(len(text) + 1), min(len(text) + 1, rnd.randint(0, 8))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def stream(chunks: list[str]) -> tuple[list[list[int]], Retokenizer]:
    r = Retokenizer(TOKENIZER)
    return [r.feed(c) for c in chunks] + [r.flush()], r


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=TEXTS, rnd=st.randoms(use_true_random=False))
def test_streamed_ids_are_the_ids_of_the_whole_text_and_decode_to_it_exactly(text: str, rnd: random.Random) -> None:
    chunks = chunked(text, rnd)
    emitted, r = stream(chunks)
    ids = [i for piece in emitted for i in piece]
    assert decode(TOKENIZER, ids) == text, chunks
    assert ids == TOKENIZER.encode(text, add_special_tokens=False).ids, chunks
    assert r.count == len(ids)


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_decode_of_encode_is_the_text_exactly(text: str) -> None:
    """No normalizer: the prompt the CLI gets is the text the ids were made from (NFD stays NFD)."""
    assert decode(TOKENIZER, TOKENIZER.encode(text, add_special_tokens=False).ids) == text


def test_ids_come_as_words_settle_and_the_last_word_waits_for_the_end() -> None:
    emitted, _ = stream(["Hello", " wor", "ld, how", " are", " you"])
    texts = [decode(TOKENIZER, ids) for ids in emitted]
    # each word once the next one began; the last at the end
    assert texts == ["", "Hello", " world,", " how", " are", " you"]


def test_an_unfinished_special_token_is_held_back_until_it_completes() -> None:
    emitted, _ = stream(["Done. <|im", "_end|>"])
    assert decode(TOKENIZER, emitted[0]) == "Done."
    assert TOKENIZER.token_to_id("<|im_end|>") in emitted[1] + emitted[2]


def test_a_run_of_spaces_and_newlines_is_held_back_whole() -> None:
    """`` \\n`` + `` `` is two pre-tokens, `` \\n \\n`` one: the run waits until it ends."""
    emitted, _ = stream(["a \n ", "\nb"])
    assert decode(TOKENIZER, emitted[0]) == "a"
    assert [i for piece in emitted for i in piece] == TOKENIZER.encode("a \n \nb", add_special_tokens=False).ids
