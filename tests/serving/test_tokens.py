"""HostTokenizer and IncrementalDetokenizer on the real Qwen3.5 vocabulary."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from server.errors import ContextLengthExceeded
from server.serving.tokens import ENDOFTEXT, IM_END, HostTokenizer

# Text with what breaks naive detokenizers: emoji (4-byte, ZWJ sequences, skin tones, flags), CJK,
# combining marks, RTL scripts, plus ASCII and whitespace.
TRICKY = st.sampled_from(
    ["👨‍👩‍👧", "🎉", "👍🏽", "🇫🇷", "世界", "日本語", "한국어", "é", "e\u0301", "مرحبا", "Ω", "\n", "  ", "\t", "a"]
)
TEXT = st.lists(st.one_of(st.text(min_size=0, max_size=8), TRICKY), max_size=12).map("".join)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def stream(tok: HostTokenizer, ids: list[int], chunks: list[int] | None = None) -> list[str]:
    detok = tok.detokenizer()
    out: list[str] = []
    i = 0
    sizes = iter(chunks or [])
    while i < len(ids):
        n = max(1, next(sizes, 1))
        out.append(detok.feed(ids[i : i + n]))
        i += n
    out.append(detok.flush())
    return out


@SETTINGS
@given(text=TEXT)
def test_streaming_ids_one_by_one_gives_back_the_text_without_replacement_chars(
    qwen_tokenizer: HostTokenizer, text: str
) -> None:
    ids = qwen_tokenizer.encode(text)
    pieces = stream(qwen_tokenizer, ids)
    assert "".join(pieces) == qwen_tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # no half characters, ever
    # byte-level BPE is lossless up to NFC normalization
    import unicodedata

    assert "".join(pieces) == unicodedata.normalize("NFC", text)


@SETTINGS
@given(text=TEXT, chunks=st.lists(st.integers(1, 4), max_size=40))
def test_any_grouping_of_ids_gives_the_same_text(qwen_tokenizer: HostTokenizer, text: str, chunks: list[int]) -> None:
    ids = qwen_tokenizer.encode(text)
    assert "".join(stream(qwen_tokenizer, ids, chunks)) == "".join(stream(qwen_tokenizer, ids))


def test_emoji_is_released_on_its_last_token_not_before(qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode("🎉")
    assert len(ids) > 1  # split across tokens in this vocabulary
    detok = qwen_tokenizer.detokenizer()
    assert [detok.feed([i]) for i in ids] == [""] * (len(ids) - 1) + ["🎉"]


def test_unfinished_character_at_the_end_becomes_one_replacement_char(qwen_tokenizer: HostTokenizer) -> None:
    ids = qwen_tokenizer.encode("🎉")
    detok = qwen_tokenizer.detokenizer()
    assert detok.feed(ids[:-1]) == ""
    assert detok.flush() == "\ufffd"


def test_special_tokens_in_text_are_parsed_and_decoded(qwen_tokenizer: HostTokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = qwen_tokenizer.encode(text)
    assert ids[0] == 248045 and ids[-1] == 248046
    assert qwen_tokenizer.decode(ids) == text
    assert "".join(stream(qwen_tokenizer, ids)) == text


def test_no_special_tokens_are_added(qwen_tokenizer: HostTokenizer) -> None:
    assert qwen_tokenizer.encode("hello") == qwen_tokenizer._tk.encode("hello", add_special_tokens=False).ids
    assert qwen_tokenizer.encode("") == []


def test_stop_ids_are_the_qwen_eos_tokens(qwen_tokenizer: HostTokenizer) -> None:
    assert qwen_tokenizer.special_id(ENDOFTEXT) == 248044
    assert qwen_tokenizer.special_id(IM_END) == 248046


def test_ids_outside_the_vocabulary_decode_to_nothing(qwen_tokenizer: HostTokenizer) -> None:
    detok = qwen_tokenizer.detokenizer()
    assert detok.feed([248300, -1]) == ""  # the model's padded vocab is larger than the tokenizer's
    assert qwen_tokenizer.decode([248300]) == ""


def test_min_tokens_is_a_lower_bound(qwen_tokenizer: HostTokenizer) -> None:
    for text in [" " * 5000, "-" * 5000, "hello world " * 300, "日本語" * 500, "\u1100\u1161\u11a8" * 300]:
        assert qwen_tokenizer.min_tokens(text) <= len(qwen_tokenizer.encode(text))
    assert qwen_tokenizer.min_tokens("x" * 1_000_000) > 1024  # a 1 MB prompt is rejected untokenized


async def test_encode_async_matches_encode_for_long_texts(qwen_tokenizer: HostTokenizer) -> None:
    text = "The quick brown fox. " * 2000
    assert await qwen_tokenizer.encode_async(text) == qwen_tokenizer.encode(text)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunk=st.text(min_size=1, max_size=40), special=st.sampled_from(["", "<|im_start|>", IM_END, ENDOFTEXT]))
async def test_encode_async_is_encode_on_the_threaded_path(
    qwen_tokenizer: HostTokenizer, chunk: str, special: str
) -> None:
    text = (chunk + special) * (17_000 // len(chunk + special) + 1)  # over the 16 K threshold
    assert await qwen_tokenizer.encode_async(text) == qwen_tokenizer.encode(text)


async def test_encode_async_leaves_the_event_loop_free(qwen_tokenizer: HostTokenizer) -> None:
    """Defect: tokenizers' ``encode`` holds the GIL, so running it in a worker thread still froze the
    loop for the whole encode (a 6 MB prompt stalled /health ~3 s). Counted, not timed: a loop that is
    free ticks hundreds of times while ~0.5 MB is tokenized; a frozen one ticks ~once."""
    text = "1234567890" * 50_000  # ~0.5 s of tokenizing (one token per digit)
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # the ticker is running before the encode starts
    start = ticks
    ids = await qwen_tokenizer.encode_async(text)
    done.set()
    await task
    assert len(ids) == len(text)
    assert ticks - start >= 20, f"the event loop ticked {ticks - start} times while tokenizing"


def test_check_may_fit_refuses_only_what_cannot_fit(qwen_tokenizer: HostTokenizer) -> None:
    fits = "x" * (1024 * 4 * qwen_tokenizer.max_token_bytes)  # its bound is exactly 1024 tokens
    qwen_tokenizer.check_may_fit(fits, 1024)
    with pytest.raises(ContextLengthExceeded, match="at least 1025 tokens") as err:
        qwen_tokenizer.check_may_fit(fits + "x", 1024, param="messages")
    assert err.value.param == "messages"


@pytest.fixture(scope="module")
def word_level() -> HostTokenizer:
    """A non-byte-level tokenizer (word pieces with a Metaspace decoder): the window fallback."""
    vocab = {"▁hello": 0, "▁world": 1, "▁": 2, "hé": 3, "llo": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="▁"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    return HostTokenizer(tk)


def test_window_fallback_streams_like_decode(word_level: HostTokenizer) -> None:
    ids = [0, 1, 3, 4, 0]
    assert "".join(stream(word_level, ids)) == word_level.decode(ids)
