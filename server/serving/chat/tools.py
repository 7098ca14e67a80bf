"""Tool calling in Qwen3.5's format: the request's tool plan, and the incremental call parser.

The model calls a tool by writing (one block per call; several blocks for parallel calls)::

    <tool_call>
    <function=NAME>
    <parameter=KEY>
    VALUE
    </parameter>
    </function>
    </tool_call>

:class:`ToolCallParser` turns the content stream into plain text and OpenAI tool-call pieces:
a :class:`CallStarted` (index, id, name; the client's first delta), then :class:`ArgumentsDelta`
fragments, one per parameter, that concatenate to a JSON object. A call's pieces are held until the
call is complete (its ``</function>``, or ``</tool_call>`` when that is forgotten): a reply that ends
inside a call (stop string, max tokens, end of turn) ends a call cut short, which is not a call, and
its text becomes content; a client never receives a piece of a call it will not get in full.
Parameter values are typed by the tool's JSON schema (numbers, booleans, objects...), else kept as
strings; only strict JSON counts (no ``NaN``, ``Infinity``, numbers beyond a double, lone
surrogates), so ``arguments`` is always strict JSON. Text that does not follow the format stays
content; a call whose body breaks off (text that is no parameter) is closed with the parameters it
has: never an exception.

Tool choice (:func:`plan_tools`), as vLLM does where it can, and by pre-filling the reply where a
call must be forced (the phones cannot constrain decoding):

* ``none``: tools still rendered in the prompt (vLLM's default), nothing parsed as a call;
* ``auto`` (default): rendered and parsed;
* ``required``: the reply is pre-filled with ``<tool_call>\\n<function=``: the model picks the tool;
* named ``{"type": "function", "function": {"name": N}}``: only N is rendered and the reply is
  pre-filled with ``<tool_call>\\n<function=N>\\n``: the model writes the arguments.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.errors import InvalidRequest, UnsupportedParameter
from server.serving.chat.reasoning import partial_suffix

logger = logging.getLogger(__name__)

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAM_OPEN = "<parameter="
PARAM_CLOSE = "</parameter>"

_ID_ALPHABET = string.ascii_letters + string.digits


def new_call_id() -> str:
    """``call_`` and 24 random letters and digits, like OpenAI's ids."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


# --- the request's plan ------------------------------------------------------------------------


@dataclass(slots=True)
class ToolPlan:
    """What the tools of one request mean for the prompt and for the output."""

    rendered: list[dict[str, Any]] | None  # tools passed to the template (None: no tools block)
    parse: bool  # parse <tool_call> blocks out of the content
    prefill: str = ""  # text appended to the generation prompt (the reply's forced start)
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> parameters schema


def plan_tools(tools: Sequence[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> ToolPlan:
    """Decide rendering, parsing and pre-fill from OpenAI ``tools`` and ``tool_choice`` (plain dicts)."""
    tools = list(tools or [])
    for i, tool in enumerate(tools):
        if tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise UnsupportedParameter(
                f"tools[{i}]: only tools of type 'function' are supported", param=f"tools[{i}].type"
            )
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    choice = tool_choice if tool_choice is not None else "auto"
    if not tools:
        if choice in ("none", "auto"):
            return ToolPlan(rendered=None, parse=False)
        raise InvalidRequest("tool_choice requires tools", param="tool_choice")
    if choice == "none":
        return ToolPlan(rendered=tools, parse=False, schemas=schemas)
    if choice == "auto":
        return ToolPlan(rendered=tools, parse=True, schemas=schemas)
    if choice == "required":
        return ToolPlan(rendered=tools, parse=True, prefill=f"{CALL_OPEN}\n{FUNCTION_OPEN}", schemas=schemas)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise InvalidRequest(f"tool_choice names function {name!r}, which is not in tools",
                                 param="tool_choice")
        return ToolPlan(rendered=chosen, parse=True, prefill=f"{CALL_OPEN}\n{FUNCTION_OPEN}{name}>\n",
                        schemas={name: schemas[name]})
    raise UnsupportedParameter(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


# --- typing parameter values -------------------------------------------------------------------


def _schema_types(schema: dict[str, Any]) -> list[str]:
    types: list[str] = []
    declared = schema.get("type")
    if isinstance(declared, str):
        types.append(declared)
    elif isinstance(declared, list):
        types.extend(t for t in declared if isinstance(t, str))
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            if isinstance(sub, dict):
                types.extend(_schema_types(sub))
    if not types and "enum" in schema:
        types.extend(sorted({_json_type(v) for v in schema["enum"]}))
    return types


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string"


def _reject_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _finite_float(number: str) -> float:
    value = float(number)
    if not math.isfinite(value):
        raise ValueError(f"{number} does not fit a double")
    return value


def strict_json(text: str) -> Any:
    """``json.loads`` that accepts only what strict parsers accept back: no ``NaN``/``Infinity``
    (Python's extension), no number that overflows a double (``1e999``), no string that cannot be
    sent as UTF-8 (an escaped lone surrogate), nothing nested past the recursion limit. ``ValueError``
    otherwise."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # UnicodeEncodeError is a ValueError
    except RecursionError as exc:  # nested deeper than the interpreter's limit: not typed, and no 500
        raise ValueError("nested too deeply") from exc
    return value


def _as_type(raw: str, kind: str) -> tuple[bool, Any]:
    text = raw.strip()
    if kind == "null":
        return (text in ("null", "None"), None)
    if kind == "boolean":
        lowered = text.lower()
        return (lowered in ("true", "false"), lowered == "true")
    try:
        value = strict_json(text)
    except ValueError:
        return (False, None)
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)
    return (_json_type(value) == kind or (kind == "number" and _json_type(value) == "integer"), value)


def convert_value(raw: str, schema: dict[str, Any] | None) -> Any:
    """A parameter's text as the JSON value its schema asks for; the text itself when it does not
    parse as any of the schema's types (or the parameter is unknown: ``schema`` None). Only strict
    JSON parses (:func:`strict_json`): ``NaN``, ``Infinity`` or ``1e999`` stay text."""
    if schema is None:
        return raw
    types = _schema_types(schema)
    if not types:  # declared, but typeless ("any"): JSON when it is JSON
        try:
            return strict_json(raw)
        except ValueError:
            return raw
    for kind in types:
        if kind == "string":
            continue
        ok, value = _as_type(raw, kind)
        if ok:
            return value
    return raw


# --- the parser --------------------------------------------------------------------------------


@dataclass(slots=True)
class Text:
    """Plain content."""

    text: str


@dataclass(slots=True)
class CallStarted:
    index: int
    id: str
    name: str


@dataclass(slots=True)
class ArgumentsDelta:
    index: int
    fragment: str


ParserEvent = Text | CallStarted | ArgumentsDelta


@dataclass(slots=True)
class ToolCall:
    """A complete call, for non-streaming responses."""

    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(slots=True)
class _OpenCall:
    index: int
    id: str
    name: str
    arguments: str = ""
    count: int = 0  # parameters parsed so far
    held: list[ParserEvent] = field(default_factory=list)  # its pieces, sent when the call is complete


_HEADER = re.compile(r"\s*<function=\s*([^<>\s]+)\s*>")
_NAME = re.compile(r"[^<>\s]+")  # what a header carries as a name


def check_tool_name(name: str) -> str:
    """A function name the model can call (the requests' validators: a 400 naming the field). Calls
    are written ``<function=NAME>``: a name with whitespace, '<' or '>' came back as markup in the
    text, or as a call to part of it ("a>b": a call to "a")."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name[:64]!r} cannot be called: this model writes a call as <function=NAME>, so "
                         "a tool's name holds no whitespace, '<' or '>' (OpenAI allows letters, digits, '_' "
                         "and '-', up to 64)")
    return name
_REPEATED_HEADER = re.compile(r"<tool_call>\s*<function=\s*([^<>\s]+)\s*>")
_PARAM_HEAD = re.compile(r"<parameter=([^>\n]*)>")


def _header_undecided(text: str) -> bool:
    """Could more text still make ``text`` a ``<function=NAME>`` header?"""
    head = text.lstrip()
    if FUNCTION_OPEN.startswith(head):
        return True
    rest = head[len(FUNCTION_OPEN):]
    return head.startswith(FUNCTION_OPEN) and re.fullmatch(r"\s*[^<>\s]*\s*", rest) is not None


class ToolCallParser:
    """Incremental parser of the content stream (after reasoning is split off).

    ``feed(text)`` and ``finish()`` return :class:`ParserEvent` lists; ``calls`` holds the complete
    calls. ``prefill``: text the prompt already holds at the start of the reply (see
    :func:`plan_tools`); it is parsed but never returned as content.

    Whitespace between content and a call, between calls and after the last call is dropped (the
    template renders it back itself); other content is kept as generated.
    """

    def __init__(self, schemas: dict[str, dict[str, Any]], *, prefill: str = "",
                 new_id: Callable[[], str] = new_call_id) -> None:
        self._schemas = schemas
        self._new_id = new_id
        self._buf = ""
        self._in_call = False
        self._part = "header"  # inside a call: header | body | after
        self._raw = ""  # the current call's text consumed so far (content again if it is malformed)
        self._hidden = 0  # leading chars of _raw that are pre-fill, never content
        self._open: _OpenCall | None = None
        self._pending_ws = ""  # trailing whitespace of content, held until we know what follows
        self._ws_before_call = ""
        self._after_call = False  # a call ended: whitespace that ends the reply is dropped
        self._said_something = False  # content emitted: leading whitespace is no longer dropped
        self._events: list[ParserEvent] = []
        self.calls: list[ToolCall] = []
        if prefill:
            self._hidden = len(prefill)
            self._events = self.feed(prefill)  # returned by the first feed()

    # -- public ---------------------------------------------------------------------------------

    def feed(self, text: str) -> list[ParserEvent]:
        self._buf += text
        while self._step(final=False):
            pass
        events, self._events = self._events, []
        return events

    def finish(self) -> list[ParserEvent]:
        while self._step(final=True):
            pass
        if self._in_call:
            self._end_at_eof()
        if self._buf:
            self._content(self._buf)
            self._buf = ""
        if self._pending_ws and not self.calls:  # whitespace after calls ends nothing
            self._events.append(Text(self._pending_ws))
        self._pending_ws = ""
        events, self._events = self._events, []
        return events

    # -- content --------------------------------------------------------------------------------

    def _content(self, text: str) -> None:
        text = self._pending_ws + text
        if self._after_call and not self._said_something:
            text = text.lstrip()
        body = text.rstrip()
        self._pending_ws = text[len(body):]
        if body:
            self._events.append(Text(body))
            self._said_something = True

    # -- the state machine ----------------------------------------------------------------------

    def _step(self, *, final: bool) -> bool:
        if not self._in_call:
            start = self._buf.find(CALL_OPEN)
            if start >= 0:
                self._content(self._buf[:start])
                self._ws_before_call, self._pending_ws = self._pending_ws, ""
                self._buf = self._buf[start + len(CALL_OPEN):]
                self._raw = CALL_OPEN
                self._in_call, self._part = True, "header"
                return True
            keep = 0 if final else partial_suffix(self._buf, CALL_OPEN)
            self._content(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep:]
            return False
        if self._part == "header":
            return self._step_header(final)
        if self._part == "body":
            return self._step_body()
        return self._step_after(final)

    def _consume(self, n: int) -> None:
        self._raw += self._buf[:n]
        self._buf = self._buf[n:]

    def _step_header(self, final: bool) -> bool:
        match = _HEADER.match(self._buf)
        if match:
            self._consume(match.end())
            name = match.group(1)
            self._open = _OpenCall(index=len(self.calls), id=self._new_id(), name=name)
            self._open.held.append(CallStarted(self._open.index, self._open.id, name))
            self._part = "body"
            return True
        if _header_undecided(self._buf) and not final:
            return False
        self._fall_back()
        return True

    def _fall_back(self) -> None:
        """The text after <tool_call> is not a call: it was content all along. It is scanned again
        (it may hold a real call), except the rejected opening tag, or the pre-fill."""
        text = self._raw + self._buf
        hidden = self._hidden
        self._in_call = False
        self._raw = ""
        self._hidden = 0
        self._pending_ws = self._ws_before_call
        if hidden:
            self._buf = text[hidden:]
        else:
            self._content(CALL_OPEN)
            self._buf = text[len(CALL_OPEN):]

    def _step_body(self) -> bool:
        buf = self._buf
        head = buf.lstrip()
        skipped = len(buf) - len(head)
        if head.startswith(PARAM_OPEN):
            match = _PARAM_HEAD.match(head)
            if match is None:
                if "\n" not in head and ">" not in head:  # name still arriving (at the end: cut short)
                    return False
                return self._break_off()
            value_start = match.end()
            ends = [i for i in (head.find(PARAM_CLOSE, value_start), head.find(FUNCTION_CLOSE, value_start))
                    if i >= 0]
            if not ends:  # value still arriving (at the end: cut short)
                return False
            end = min(ends)
            self._add_parameter(match.group(1), head[value_start:end])
            after = end + len(PARAM_CLOSE) if head.startswith(PARAM_CLOSE, end) else end
            self._consume(skipped + after)
            return True
        if self._open is not None and self._open.count == 0 and head.startswith(CALL_OPEN):
            # a model repeating the pre-filled header (tool_choice): skip the repeat
            match = _REPEATED_HEADER.match(head)
            if match and match.group(1) == self._open.name:
                self._consume(skipped + match.end())
                return True
            if match is None and _header_undecided(head[len(CALL_OPEN):]):
                return False
            return self._break_off()
        if head.startswith(FUNCTION_CLOSE):
            self._consume(skipped + len(FUNCTION_CLOSE))
            self._close_call()
            self._part = "after"
            return True
        if head.startswith(CALL_CLOSE):  # </function> forgotten
            self._consume(skipped + len(CALL_CLOSE))
            self._close_call()
            self._leave_call()
            return True
        may_follow = [PARAM_OPEN, FUNCTION_CLOSE, CALL_CLOSE]
        if self._open is not None and self._open.count == 0:
            may_follow.append(CALL_OPEN)  # a repeated header may still be arriving
        if any(tag.startswith(head) for tag in may_follow):  # a tag still arriving (at the end: cut short)
            return False
        return self._break_off()

    def _step_after(self, final: bool) -> bool:
        head = self._buf.lstrip()
        if head.startswith(CALL_CLOSE):
            self._consume(len(self._buf) - len(head) + len(CALL_CLOSE))
            self._leave_call()
            return True
        if CALL_CLOSE.startswith(head):  # </tool_call> may be arriving; at the end, its half is markup
            if not final:
                return False
            self._consume(len(self._buf))
        self._leave_call()  # </tool_call> forgotten: the call is complete anyway
        return True

    def _break_off(self) -> bool:
        """Junk inside a call body: close the call with what it has; the rest is content."""
        logger.debug("malformed tool call body, closing call %s", self._open and self._open.id)
        self._close_call()
        self._leave_call()
        return True

    def _end_at_eof(self) -> None:
        if self._part == "header":
            self._fall_back()
            while self._step(final=True):
                pass
        elif self._part == "body":
            self._cut_call()
        else:
            self._leave_call()

    def _cut_call(self) -> None:
        """The reply ended inside the call's body: a call cut short is no call (its arguments may
        lack a required parameter, or hold half a value). What the model wrote of it is content,
        the pre-fill excepted; none of its pieces were sent."""
        logger.debug("reply ended inside tool call %s: returned as content", self._open and self._open.id)
        text = (self._raw + self._buf)[self._hidden:]
        self._open = None
        self._buf = ""
        self._in_call, self._part, self._raw, self._hidden = False, "header", "", 0
        self._pending_ws = self._ws_before_call
        self._content(text)

    def _leave_call(self) -> None:
        self._in_call = False
        self._raw = ""
        self._hidden = 0
        self._after_call = True
        self._part = "header"

    def _add_parameter(self, name: str, value: str) -> None:
        assert self._open is not None
        value = value.removeprefix("\n")
        value = value.removesuffix("\n")
        name = name.strip()
        schema = self._schemas.get(self._open.name, {})
        properties = schema.get("properties") if isinstance(schema, dict) else None
        prop = properties.get(name) if isinstance(properties, dict) else None
        typed = convert_value(value, prop if isinstance(prop, dict) else None)
        sep = "{" if self._open.count == 0 else ", "
        fragment = (sep + json.dumps(name, ensure_ascii=False) + ": "
                    + json.dumps(typed, ensure_ascii=False, allow_nan=False))  # typed values are strict JSON
        self._open.count += 1
        self._emit_arguments(fragment)

    def _emit_arguments(self, fragment: str) -> None:
        assert self._open is not None
        self._open.arguments += fragment
        self._open.held.append(ArgumentsDelta(self._open.index, fragment))

    def _close_call(self) -> None:
        """The call is complete: its pieces go out."""
        call = self._open
        if call is None:
            return
        self._emit_arguments("}" if call.count else "{}")
        self.calls.append(ToolCall(id=call.id, name=call.name, arguments=call.arguments))
        self._events += call.held
        self._open = None
