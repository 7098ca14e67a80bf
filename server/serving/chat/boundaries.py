"""Where a rendered chat prompt is worth keeping on the phone (state reuse, docs/state-reuse.md).

A phone may save a checkpoint of its state at a :class:`~server.backends.base.Boundary` of the
prompt, so that a later request that starts the same way starts from there. In a chat two places
are worth it, both found on the token ids, at ``<|im_start|>`` tokens (one special id each)::

    <|im_start|>system ... <|im_end|>\\n<|im_start|>user ... <|im_end|>\\n<|im_start|>assistant\\n<think>...
                                        ^ shared                                           ^ last
                                        (end of the system/tools block)  (last message boundary, past its header)

* **last**: just after the header of the generation prompt (``<|im_start|>assistant\n``, the final
  ``<|im_start|>`` and its role line). The next turn of the conversation holds everything before it
  (the history as rendered now, and the same header opening the reply), while what comes after it is
  rendered differently next time (Qwen's template drops the empty think block of earlier replies and
  their reasoning), so the state after the reply is not a prefix of the next prompt. Saved here, it
  is (not shared: the conversation's own, superseded by its next turn's). Past the header rather
  than before it: every later turn then processes three tokens fewer (about 0.1 s on the phone); a
  regeneration (the same prompt again) restores it too. When the role line is not one newline away
  (no ``newline`` id given, or an odd prompt), the boundary stays at the ``<|im_start|>``.
* **shared**: the second ``<|im_start|>``, when the prompt opens with a system turn (which also holds
  the tools block): every conversation with the same system prompt and tools starts with it.

A ``<|im_start|>`` written in a message's text is one special id too (the tokenizer parses specials
in text, as HF's chat templates expect), so it can move a boundary: a boundary is a hint for saving,
never a claim about the prompt, so the worst that does is a checkpoint that is not reused.
"""

from __future__ import annotations

from collections.abc import Sequence

from server.backends.base import Boundary

HEADER_MAX = 4  # ``<|im_start|>``, a role of one or two tokens, the newline


def chat_boundaries(ids: Sequence[int], im_start: int, *, opens_with_system: bool,
                    newline: int | None = None) -> list[Boundary]:
    """The boundaries of a rendered chat prompt (its ids; ``im_start`` is ``<|im_start|>``'s id,
    ``newline`` the id of ``"\n"``), in order: the end of the system/tools block (``shared``, only
    when ``opens_with_system``), then the last message boundary, past the header of the last message
    when ``newline`` is given. One boundary where both fall on the same token (kept shared)."""
    starts = [i for i, token in enumerate(ids) if token == im_start]
    found: list[Boundary] = []
    if opens_with_system and len(starts) >= 2 and starts[0] == 0:
        found.append(Boundary(starts[1], shared=True))
    if starts and starts[-1] > (found[-1].at if found else 0):
        found.append(Boundary(_past_header(ids, starts[-1], newline)))
    return found


def _past_header(ids: Sequence[int], start: int, newline: int | None) -> int:
    """Just after the role line of the message whose ``<|im_start|>`` is at ``start``; ``start`` when
    there is no newline within :data:`HEADER_MAX` tokens of it."""
    if newline is not None:
        for i in range(start + 1, min(start + HEADER_MAX, len(ids))):
            if ids[i] == newline:
                return i + 1
    return start
