"""GPT-2's reversible byte <-> printable-character table, used by byte-level BPE vocabularies such
as Qwen's. Shared by the host tokenizer (server/serving/tokens.py) and the simulated phone's
vocabulary (server/sim/vocab.py), which must agree on it byte for byte."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_encoder() -> dict[int, str]:
    """Byte -> the printable character that stands for it in vocabulary pieces."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Inverse of :func:`byte_encoder`: a vocabulary piece's characters back to raw bytes."""
    return {c: b for b, c in byte_encoder().items()}
