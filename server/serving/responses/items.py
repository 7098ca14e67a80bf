"""A Responses conversation as chat messages: the request's input items converted, the output of a
response turned back into the assistant turn it was, and the whole rendered the way a chat is.

A response's prompt is the chat prompt of: one system message (``instructions`` and the
conversation's leading system/developer messages), the conversation so far (the stored one of
``previous_response_id``, whose own instructions are not carried over, as OpenAI does), then this
request's input. Rendered by the chat template, the same conversation gives the same prompt text at
every turn, so the phone that kept a turn's state is the one routing picks for the next
(docs/state-reuse.md).

Conversion (``param`` of each 400 names the input item's field):

* a string: one user message;
* a message (``type`` "message" or absent) of role user, system, developer or assistant: its text
  (``input_text``, ``output_text``, ``refusal`` parts); images, files and audio are refused;
  system and developer messages only at the very beginning of the conversation (the template's rule);
* consecutive ``reasoning``, assistant ``message`` and ``function_call`` items are one assistant
  turn (reasoning text, content, tool calls), as the model wrote them: text after a call joins the
  turn's content, as the reply parser and a stored response hold it; two messages in a row are two
  turns, and so is reasoning after text or a call (a response's output never has either);
* ``function_call_output``: a tool message; its ``call_id`` must be one of the conversation's calls;
* anything else (``item_reference``, built-in tool calls): refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from server.errors import InvalidRequest, UnsupportedParameter
from server.serving.chat.tools import strict_json
from server.serving.responses.protocol import (
    ContentPart,
    FunctionCall,
    InputItem,
    OutputItem,
    OutputMessage,
    ReasoningItem,
)

Message = dict[str, Any]  # a chat message, as ChatMessage validates it

_SYSTEM_ROLES = ("system", "developer")
_ROLES = ("user", "assistant", *_SYSTEM_ROLES)
_TEXT_PARTS = {"input_text", "output_text", "text"}


def input_messages(items: str | Sequence[InputItem] | None, earlier: Sequence[Message]) -> list[Message]:
    """The request's input as chat messages, continuing ``earlier`` (the stored conversation)."""
    if items is None:
        return []
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    return _Converter(earlier).convert(items)


def system_message(instructions: str | None, conversation: Sequence[Message]) -> list[Message]:
    """The conversation with ``instructions`` and its leading system messages as one system message
    (the template takes a single one, first)."""
    head = leading_system(conversation)
    texts = [instructions] if instructions else []
    texts += [m["content"] for m in conversation[:head] if m["content"]]
    rest = list(conversation[head:])
    return [{"role": "system", "content": "\n\n".join(texts)}, *rest] if texts else rest


def leading_system(conversation: Sequence[Message]) -> int:
    """How many system (or developer) messages the conversation opens with."""
    head = 0
    while head < len(conversation) and conversation[head]["role"] in _SYSTEM_ROLES:
        head += 1
    return head


def assistant_turn(output: Sequence[OutputItem]) -> list[Message]:
    """A response's output as the assistant message it continues from (none for an empty output)."""
    if not output:
        return []
    turn: Message = {"role": "assistant", "content": ""}
    for item in output:
        if isinstance(item, ReasoningItem):
            turn["reasoning_content"] = "".join(part.text for part in item.content)
        elif isinstance(item, OutputMessage):
            turn["content"] += "".join(part.text for part in item.content)
        elif isinstance(item, FunctionCall):
            turn.setdefault("tool_calls", []).append(_call(item.call_id, item.name, strict_json(item.arguments)))
    return [turn]


def _call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class _Converter:
    """Input items -> chat messages; one assistant turn is gathered from consecutive items."""

    def __init__(self, earlier: Sequence[Message]) -> None:
        self._calls = {c["id"] for m in earlier for c in m.get("tool_calls") or []}
        self._out: list[Message] = []
        self._turn: Message | None = None  # the assistant turn being gathered
        self._message_last = False  # its last item was a message
        # a system message may still come: nothing but system messages so far (kept, not searched
        # for at every message: a body of 100,000 system messages must not take quadratic time)
        self._system_may_follow = all(m["role"] in _SYSTEM_ROLES for m in earlier)

    def convert(self, items: Sequence[InputItem]) -> list[Message]:
        for i, item in enumerate(items):
            kind = item.type or "message"
            if kind == "message":
                self._message(i, item)
            elif kind == "function_call":
                self._function_call(i, item)
            elif kind == "function_call_output":
                self._function_call_output(i, item)
            elif kind == "reasoning":
                self._reasoning(item)
            else:
                raise UnsupportedParameter(
                    f"input[{i}]: items of type {kind!r} are not supported (only messages, function_call, "
                    "function_call_output and reasoning items are; there are no built-in tools).",
                    param=f"input[{i}].type",
                )
        self._end_turn()
        return self._out

    # -- assistant turns ------------------------------------------------------------------------

    def _assistant(self, *, fresh: bool) -> Message:
        """The turn being gathered, or a new one when there is none (or ``fresh``: its place is taken)."""
        if self._turn is None or fresh:
            self._end_turn()
            self._turn = {"role": "assistant", "content": ""}
        return self._turn

    def _end_turn(self) -> None:
        self._message_last = False
        if self._turn is not None:
            self._out.append(self._turn)
            self._system_may_follow = False
            self._turn = None

    def _reasoning(self, item: InputItem) -> None:
        turn = self._assistant(fresh=self._turn is not None and (bool(self._turn["content"]) or "tool_calls" in self._turn))
        turn["reasoning_content"] = "".join(p.text or "" for p in item.content or [] if isinstance(p, ContentPart))
        self._message_last = False

    def _function_call(self, i: int, item: InputItem) -> None:
        call_id = _required(i, "call_id", item.call_id)
        name = _required(i, "name", item.name)
        try:
            raw = item.arguments
            arguments = raw if isinstance(raw, dict) else strict_json(raw) if raw and raw.strip() else {}
        except ValueError as exc:
            raise InvalidRequest(f"input[{i}].arguments is not valid JSON: {exc}", param=f"input[{i}].arguments",
                                 code="invalid_value") from exc
        if not isinstance(arguments, dict):
            raise InvalidRequest(f"input[{i}].arguments must be a JSON object.", param=f"input[{i}].arguments",
                                 code="invalid_value")
        self._assistant(fresh=False).setdefault("tool_calls", []).append(_call(call_id, name, arguments))
        self._message_last = False
        self._calls.add(call_id)

    # -- other messages -------------------------------------------------------------------------

    def _message(self, i: int, item: InputItem) -> None:
        role = item.role
        if role not in _ROLES:
            raise InvalidRequest(f"input[{i}].role must be one of {', '.join(_ROLES)}.", param=f"input[{i}].role",
                                 code="invalid_value")
        if item.content is None:
            raise InvalidRequest(f"input[{i}]: a message needs its content.", param=f"input[{i}].content",
                                 code="missing_required_parameter")
        text = _text(f"input[{i}].content", item.content)
        if role == "assistant":
            # a message right after another is a turn of its own; after a call it is text the model
            # wrote in the same turn (as the reply parser holds it, and as the stored turn has it)
            turn = self._assistant(fresh=self._message_last)
            turn["content"] += text
            self._message_last = True
            return
        self._end_turn()
        if role in _SYSTEM_ROLES and not self._system_may_follow:
            raise InvalidRequest(
                f"input[{i}]: {role} messages are only allowed at the beginning of the conversation (this "
                "model's chat template takes its system text first); use instructions.",
                param=f"input[{i}].role", code="invalid_value",
            )
        self._out.append({"role": role, "content": text})
        self._system_may_follow = self._system_may_follow and role in _SYSTEM_ROLES

    def _function_call_output(self, i: int, item: InputItem) -> None:
        call_id = _required(i, "call_id", item.call_id)
        if call_id not in self._calls:
            raise InvalidRequest(f"No tool call found for function call output with call_id {call_id!r}.",
                                 param=f"input[{i}].call_id", code="invalid_value")
        if item.output is None:
            raise InvalidRequest(f"input[{i}]: a function_call_output needs its output.",
                                 param=f"input[{i}].output", code="missing_required_parameter")
        self._end_turn()
        self._system_may_follow = False
        self._out.append({"role": "tool", "tool_call_id": call_id, "content": _text(f"input[{i}].output", item.output)})


def _required(i: int, field: str, value: str | None) -> str:
    if value is None:
        raise InvalidRequest(f"input[{i}]: missing required parameter {field!r}.", param=f"input[{i}].{field}",
                             code="missing_required_parameter")
    return value


def _text(where: str, content: str | list[ContentPart]) -> str:
    """A content's text: the string, or its text parts joined (as the template joins them)."""
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for j, part in enumerate(content):
        if part.type == "refusal":
            value = part.refusal
        elif part.type in _TEXT_PARTS:
            value = part.text
        else:
            raise UnsupportedParameter(
                f"{where}[{j}]: content parts of type {part.type!r} are not supported; this model takes text only.",
                param=f"{where}[{j}].type",
            )
        if value is None:
            field = "refusal" if part.type == "refusal" else "text"
            raise InvalidRequest(f"{where}[{j}]: a {part.type!r} part needs its {field!r} (a string).",
                                 param=f"{where}[{j}].{field}", code="missing_required_parameter")
        texts.append(value)
    return "".join(texts)
