"""What the simulated model "says": well-formed text from the real Qwen3.5 vocabulary.

There are no weights, so text is assembled from a pool of units (English words, punctuation,
paragraph breaks, accented Latin, CJK, emoji) that are encoded with the bundle's tokenizer and
emitted one id at a time. Emoji split into several byte-level tokens that are not valid UTF-8 on
their own, which is exactly what the host's incremental detokenizer must cope with.

The chat structure of the context (Qwen3.5 template) steers the output:

* a generation prompt that opens ``<think>\\n`` -> reasoning text, then ``\\n</think>\\n\\n``;
* a ``<tools>`` block in the system turn, last user turn not a ``<tool_response>`` -> one Qwen3.5
  tool call for the first tool, then the end of turn;
* otherwise (or after a tool response) a plain answer, ended by a stop id at ``stop_rate``.

The caller owns limits: this generator yields ids forever unless it ends the turn by yielding a
stop id (only ever one of the request's ``stop_ids``). A request without stop ids (the host applies
``ignore_eos`` / ``min_tokens`` itself) gets the end of turn as an ordinary token, ``<|im_end|>``,
and the text goes on after it, as a model's does when nothing stops it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from server.sim.vocab import ENDOFTEXT_ID, IM_END_ID, token_bytes

_WORD_TEXT = (
    "the of and to in is that it for on with as was at by this be from are or an have not they which "
    "one you had her all she there would their we him been has when who will more no if out so said "
    "what up its about into than them can only other new some could time these two may then do first "
    "any my now such like our over man me even most made after also did many before must through back "
    "years where much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came right used "
    "take three model phone token answer question simple small fast light river city morning idea"
)
WORDS = tuple(_WORD_TEXT.split())
# Multi-byte units: accented Latin and Greek, CJK (one or several tokens) and emoji (split bytes).
EXOTIC = (
    " café", " naïve", " über", " Zürich", " señor", " Ελλάδα", " π", " —", " 東京", " 日本語",
    " 北京", " 中文", " こんにちは", " 🦙", " 🚀", " 😊", " ✨",
)
THINK_OPENERS = ("Okay, let me think about this.", "Hmm, the user wants an answer.", "Let me work this out.")
GEN_PROMPT_THINK = "<|im_start|>assistant\n<think>\n"


@dataclass(frozen=True, slots=True)
class Steering:
    """How a request's output is shaped (derived from the context and the sim knobs)."""

    open_think: bool  # emit "<think>\n" first (reasoning forced by the knob, prompt did not open it)
    reason: bool  # emit reasoning text
    close_think: bool  # emit "\n</think>\n\n" before the answer or tool call
    tool: dict | None  # the tool to call (its JSON function definition), or None
    line_start: bool = False  # the answer starts a line (a chat turn): no leading space, as a model writes


def request_rng(context: bytes, temperature: float, seed: int | None) -> random.Random:
    """Greedy: a function of the context alone. Seeded: of the seed and the context. Else random.

    ``context`` is the *text* of the whole sequence as bytes (its tokens' bytes joined), not its ids:
    two tokenizations of the same text (a host that reuses a state holding different but equivalent
    ids, docs/state-reuse.md) give the same output, as a real model does for text-identical input;
    different text gives other output. Bytes rather than the decoded string, because decoding is lossy
    where the bytes are not valid UTF-8 (a lead byte alone and a lead byte plus one continuation byte
    both decode to one U+FFFD), and a state one such token off must still give other output."""
    if temperature <= 0 or seed is not None:
        digest = hashlib.blake2b(context, digest_size=8)
        if temperature > 0:
            digest.update(str(seed).encode())
        return random.Random(int.from_bytes(digest.digest(), "little"))
    return random.Random()


def steer(context: str, *, think: bool | None, tool_call: bool | None) -> Steering:
    """Read the decoded context (Qwen3.5 chat format) and the ``think``/``tool_call`` knobs."""
    opened = context.endswith(GEN_PROMPT_THINK)
    do_think = opened if think is None else think
    tools = _tools(context)
    wants_tool = bool(tools) and not _last_user_is_tool_response(context)
    do_tool = wants_tool if tool_call is None else tool_call
    tool = (tools[0] if tools else _DEFAULT_TOOL) if do_tool else None
    # A prompt that opened <think> must see it closed even when reasoning is switched off.
    return Steering(open_think=do_think and not opened, reason=do_think, close_think=do_think or opened, tool=tool,
                    line_start=do_think or opened or context.endswith("\n"))


class TextModel:
    """Turns steering + an RNG into a stream of token ids of the real vocabulary."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._cache: dict[str, list[int]] = {}

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (special-token text such as ``</think>`` becomes the special id)."""
        ids = self._cache.get(text)
        if ids is None:
            ids = self._tok.encode(text, add_special_tokens=False).ids
            if len(self._cache) < 4096:
                self._cache[text] = ids
        return ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a raw prompt (not cached)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token: int) -> bytes:
        """Raw bytes of one token: possibly an incomplete UTF-8 sequence."""
        return token_bytes(self._tok, token)

    def text_bytes(self, ids: Sequence[int]) -> bytes:
        """The text of ``ids`` as raw bytes (special tokens spelled out), however it is split into ids."""
        return b"".join(self.token_bytes(i) for i in ids)

    def decode(self, ids: Sequence[int]) -> str:
        """Context text with special tokens spelled out (for steering)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def continue_from(
        self,
        state: Sequence[int],
        *,
        temperature: float,
        seed: int | None,
        stop_ids: Sequence[int],
        think: bool | None,
        tool_call: bool | None,
        stop_rate: float,
        min_tokens: int,
        answer: str | None = None,
    ) -> Iterator[int]:
        """What follows ``state``, the *whole* token sequence held when decoding starts.

        The only way the engine asks for text: steering and RNG both read the decoded text of the full
        sequence, so for greedy (or seeded) requests the output depends on that text alone, not on how
        the state was reached (reset, continuation, restore) nor on how the text was split into ids,
        and a state that is off by one token gives different output.
        """
        steering = steer(self.decode(state), think=think, tool_call=tool_call)
        rng = request_rng(self.text_bytes(state), temperature, seed)
        return self.stream(steering, rng, stop_ids, stop_rate=stop_rate, min_tokens=min_tokens, answer=answer)

    def stream(
        self,
        steering: Steering,
        rng: random.Random,
        stop_ids: Sequence[int],
        *,
        stop_rate: float,
        min_tokens: int,
        answer: str | None = None,
    ) -> Iterator[int]:
        """Yield ids: reasoning, then a tool call or an answer (``answer`` verbatim when given), then
        (if any) a stop id."""
        stop = _pick_stop(stop_ids)
        end = IM_END_ID if stop is None else stop  # the end of turn, a stop or an ordinary token
        if steering.open_think:
            yield from self.encode("<think>\n")
        if steering.reason:
            yield from self._prose(rng, rng.randint(2, 4), opener=rng.choice(THINK_OPENERS))
        if steering.close_think:
            yield from self.encode("\n</think>\n\n")
        if steering.tool is not None:
            yield from self.encode(tool_call_text(steering.tool, rng))
            yield end
        if answer is not None:
            yield from self.encode(answer)
            yield end
        yield from self._answer(rng, end, stop_rate=stop_rate, min_tokens=min_tokens, line_start=steering.line_start,
                                go_on=stop is None)

    def _answer(
        self, rng: random.Random, end: int, *, stop_rate: float, min_tokens: int, line_start: bool = False,
        go_on: bool = False,
    ) -> Iterator[int]:
        """Sentences until a natural end. A chat answer (``line_start``) starts without a space and a
        paragraph break is only written when another sentence follows, so that the reply has no
        leading or trailing white space (as a model's, and as a chat template's trim keeps it)."""
        emitted = 0
        checked = 0
        pending: list[str] = []  # a paragraph break held until the next sentence
        while True:
            units = pending + self._sentence(rng)
            pending = []
            if line_start:
                if emitted == 0:
                    units[0] = units[0].lstrip(" ")
                if units[-1] == "\n\n":
                    pending = [units.pop()]
            for unit in units:
                ids = self.encode(unit)
                yield from ids
                emitted += len(ids)
            # Natural ends only at sentence ends; the chance matches a per-token rate.
            eligible = max(0, emitted - max(min_tokens, checked))
            checked = max(checked, emitted)
            if eligible and rng.random() < 1 - (1 - stop_rate) ** eligible:
                yield end
                if not go_on:  # ``end`` is a stop id: the turn is over
                    return

    def _prose(self, rng: random.Random, sentences: int, opener: str) -> Iterator[int]:
        yield from self.encode(opener)
        for _ in range(sentences):
            for unit in self._sentence(rng, paragraphs=False):
                yield from self.encode(unit)

    def _sentence(self, rng: random.Random, paragraphs: bool = True) -> list[str]:
        n = rng.randint(5, 14)
        units = []
        for i in range(n):
            if i and rng.random() < 0.08:
                units.append(rng.choice(EXOTIC))
            word = rng.choice(WORDS)
            units.append(" " + (word.capitalize() if i == 0 else word))
            if 0 < i < n - 1 and rng.random() < 0.1:
                units.append(",")
        units.append(rng.choice(".....!?"))
        if paragraphs and rng.random() < 0.25:
            units.append("\n\n")
        return units


def tool_call_text(tool: dict, rng: random.Random) -> str:
    """A Qwen3.5 tool call block for ``tool`` with plausible arguments from its JSON schema. Any JSON
    gives a block: the tools are the client's, and the server checks only their outline."""
    fn = _dict(tool.get("function", tool))
    name = str(fn.get("name", "tool"))
    schema = _dict(fn.get("parameters"))
    props = _dict(schema.get("properties"))
    required = schema.get("required")
    keys = [str(k) for k in required] if isinstance(required, list) and required else list(props)[:1]
    lines = ["<tool_call>", f"<function={name}>"]
    for key in keys:
        lines += [f"<parameter={key}>", _value(key, _dict(props.get(key)), rng), "</parameter>"]
    lines += ["</function>", "</tool_call>"]
    return "\n".join(lines)


_DEFAULT_TOOL = {
    "type": "function",
    "function": {"name": "search", "parameters": {"type": "object", "required": ["query"],
                                                  "properties": {"query": {"type": "string"}}}},
}
_STRINGS = {"location": "Paris", "city": "Paris", "country": "France", "query": "capital of France",
            "unit": "celsius", "language": "en", "date": "2026-01-01", "url": "https://example.com"}


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _value(key: str, schema: dict, rng: random.Random) -> str:
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return _render(enum[0])
    kind = schema.get("type", "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "integer":
        return str(rng.randint(1, 10))
    if kind == "number":
        return str(round(rng.uniform(0.5, 10.0), 1))
    if kind == "boolean":
        return "true"
    if kind == "array":
        return json.dumps([_STRINGS.get(key, "example")])
    if kind == "object":
        return "{}"
    return _STRINGS.get(key.lower(), "example")


def _render(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _pick_stop(stop_ids: Sequence[int]) -> int | None:
    for preferred in (IM_END_ID, ENDOFTEXT_ID):
        if preferred in stop_ids:
            return preferred
    return stop_ids[0] if stop_ids else None


def _tools(context: str) -> list[dict]:
    """Function definitions from the ``<tools>`` block of the system turn (one JSON per line)."""
    start = context.find("<|im_start|>system\n")
    if start < 0:
        return []
    end = context.find("<|im_end|>", start)
    system = context[start : end if end >= 0 else len(context)]
    a, b = system.find("<tools>"), system.find("</tools>")
    if a < 0 or b < a:
        return []
    tools = []
    for line in system[a + len("<tools>") : b].splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            tools.append(obj)
    return tools


def _last_user_is_tool_response(context: str) -> bool:
    last = context.rfind("<|im_start|>user")
    return last >= 0 and "<tool_response>" in context[last:]
