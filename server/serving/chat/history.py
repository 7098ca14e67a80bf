"""``history_render: as-generated`` (docs/chat.md, "History as generated"): earlier assistant turns
rendered as the phone generated them, so that a phone's live state (the last prompt and the reply
it generated) is a prefix of the next turn's prompt and the phone continues from it without
processing the conversation again, also on runtimes without checkpoints (docs/state-reuse.md).

Qwen's template renders an earlier reply as ``<|im_start|>assistant\\n{content}<|im_end|>``: its
think block is gone (the empty one of a reply generated with thinking off, and the reasoning of one
generated with it on), although the prompt the phone answered ended with
``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`` (thinking off) or ``...<think>\\n`` (on). This
puts the block back into the template's text, right after each assistant turn's header:

* ``<think>\\n{reasoning}\\n</think>\\n\\n`` when the client sent the turn's reasoning back
  (``reasoning_content``, or a think block inside ``content``, as the template reads it);
* ``<think>\\n\\n</think>\\n\\n`` otherwise: what the generation prompt held with thinking off.

A turn the template already rendered with its block (a reply of the current tool loop, with its
reasoning) is left as it is. The text is the template's otherwise, so any template in Qwen's format
works; when the assistant headers cannot be matched one to one with the assistant messages (an
``<|im_start|>assistant`` written in a message's text, another format), the template's text is used
unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

from server.serving.chat.reasoning import THINK_CLOSE, THINK_OPEN

logger = logging.getLogger(__name__)

HistoryRender = Literal["template", "as-generated"]  # the setting's values

ASSISTANT_HEADER = "<|im_start|>assistant\n"
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"


def think_block(message: dict[str, Any]) -> str:
    """The think block an assistant message (a template dict) was generated with, as far as the
    client sent it back."""
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        content = message.get("content")
        text = content if isinstance(content, str) else "".join(
            p.get("text", "") for p in content or [] if isinstance(p, dict))
        # as the template reads a think block written in the content
        reasoning = text.split(THINK_CLOSE)[0].split(THINK_OPEN)[-1] if THINK_CLOSE in text else ""
    reasoning = reasoning.strip("\n")
    return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n" if reasoning else EMPTY_THINK


def as_generated(text: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool) -> str:
    """The template's ``text`` for ``messages`` (template dicts) with each assistant turn's think
    block put back; ``text`` unchanged when its assistant headers are not one per assistant message
    (plus the generation prompt's)."""
    blocks = [think_block(m) for m in messages if m.get("role") == "assistant"]
    heads: list[int] = []
    at = text.find(ASSISTANT_HEADER)
    while at >= 0:
        heads.append(at + len(ASSISTANT_HEADER))
        at = text.find(ASSISTANT_HEADER, at + 1)
    if len(heads) != len(blocks) + add_generation_prompt:  # the generation prompt's header has no reply yet
        logger.debug("history as generated: %d assistant headers for %d assistant messages; the template's "
                     "text is used", len(heads), len(blocks))
        return text
    pieces: list[str] = []
    done = 0
    for head, block in zip(heads, blocks, strict=False):
        if text.startswith(THINK_OPEN, head):
            continue  # rendered with its block already
        pieces += [text[done:head], block]
        done = head
    return "".join(pieces) + text[done:]
