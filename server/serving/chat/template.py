"""Chat templates: find the model's Jinja template and render OpenAI messages into the prompt text.

Rendering follows Hugging Face transformers (``apply_chat_template``): a sandboxed, immutable Jinja
environment with ``trim_blocks`` and ``lstrip_blocks``, a ``tojson`` filter that is ``json.dumps``
(non-ASCII kept, no HTML escaping) and a ``raise_exception`` global. A template's
``raise_exception`` becomes :class:`server.errors.InvalidRequest` (400): it always means the
conversation is malformed (no user turn, system message not first, unknown role...).

Where the template comes from (:func:`load_chat_template`): the bundle's own, if it ships one
(``chat_template.jinja`` next to ``tokenizer.json``, or ``chat_template`` in
``tokenizer_config.json``), else the built-in Qwen3.5-0.8B template (``qwen35_0_8b.jinja``).

A request's ``chat_template_kwargs`` are further template variables, except the
:data:`RESERVED_TEMPLATE_VARIABLES`: what the server passes itself, what transformers fills from the
tokenizer, and the environment's globals. Naming one is a 400 (``param: "chat_template_kwargs"``)
on every endpoint that renders, since every render goes through :meth:`ChatTemplate.render`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.errors import InvalidRequest

logger = logging.getLogger(__name__)

BUILTIN_TEMPLATE = Path(__file__).with_name("qwen35_0_8b.jinja")
BUILTIN_SOURCE = "builtin:qwen35_0_8b.jinja"


class TemplateError(Exception):
    """The template text itself is broken (syntax): a server-side problem, not the caller's."""


def load_chat_template(tokenizer_dir: Path | None) -> tuple[str, str]:
    """Return ``(template_text, source)`` for a bundle whose tokenizer lives in ``tokenizer_dir``.

    Order: ``chat_template.jinja`` (what transformers >= 4.43 saves), then the ``chat_template`` of
    ``tokenizer_config.json`` (a string, or the list-of-named-templates form, where ``default`` is
    taken), then the built-in template. ``source`` names the file it came from, for logs and the
    debug endpoint.
    """
    if tokenizer_dir is not None:
        jinja_file = tokenizer_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
        config_file = tokenizer_dir / "tokenizer_config.json"
        if config_file.is_file():
            text = _template_from_config(config_file)
            if text is not None:
                return text, f"{config_file}:chat_template"
    return BUILTIN_TEMPLATE.read_text(encoding="utf-8"), BUILTIN_SOURCE


def _template_from_config(config_file: Path) -> str | None:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable %s: %s", config_file, exc)
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        default = named.get("default")
        if isinstance(default, str):
            return default
    return None


def _raise_exception(message: str) -> None:
    raise InvalidRequest(f"chat template: {message}", param="messages")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers overrides Jinja's tojson the same way: Jinja's escapes <, >, & and ' for HTML
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


# Template variables a client's chat_template_kwargs may not set: the ones render() passes (the
# request's own fields; enable_thinking is the exception, read from the kwargs by the chat service),
# the special tokens transformers' apply_chat_template passes from the tokenizer (a bundle template
# may use them), and the environment's globals (range, namespace, raise_exception...: replacing one
# breaks the template).
RESERVED_TEMPLATE_VARIABLES: frozenset[str] = frozenset(
    {"messages", "tools", "add_generation_prompt"}
    | {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
       "additional_special_tokens"}
    | set(_environment().globals)
)


def check_template_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Reject (400, naming them) the keys of ``chat_template_kwargs`` the client may not set."""
    reserved = sorted(RESERVED_TEMPLATE_VARIABLES.intersection(kwargs))
    if reserved:
        raise InvalidRequest(
            f"chat_template_kwargs cannot set {', '.join(map(repr, reserved))}: the server sets "
            f"{'this template variable' if len(reserved) == 1 else 'these template variables'} itself "
            "(messages and tools are request fields, add_generation_prompt a field of /tokenize); "
            "any other key is passed to the template, enable_thinking switches thinking.",
            param="chat_template_kwargs",
        )


class ChatTemplate:
    """A compiled chat template. ``render`` is pure and thread-safe."""

    def __init__(self, text: str, source: str = "inline") -> None:
        self.text = text
        self.source = source
        env = _environment()
        try:
            self._template = env.from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateError(f"chat template {source}: line {exc.lineno}: {exc.message}") from exc

    @classmethod
    def for_bundle(cls, tokenizer_dir: Path | None) -> ChatTemplate:
        text, source = load_chat_template(tokenizer_dir)
        return cls(text, source)

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Render plain-dict messages (OpenAI shapes; tool-call arguments as dicts, as transformers
        expects). ``template_kwargs`` (a request's ``chat_template_kwargs``) are further template
        variables, checked by :func:`check_template_kwargs`; ``enable_thinking`` wins over theirs."""
        check_template_kwargs(template_kwargs or {})
        variables = {
            **(template_kwargs or {}),
            "messages": messages,
            "tools": tools or None,
            "add_generation_prompt": add_generation_prompt,
            "enable_thinking": enable_thinking,
        }
        try:
            return self._template.render(variables)  # a dict: a key named "self" is a variable too
        except InvalidRequest:
            raise
        except jinja2.TemplateError as exc:
            # undefined attributes, sandbox violations, type errors inside the template: the
            # messages did not fit what the template expects
            raise InvalidRequest(f"chat template {self.source} failed on these messages: {exc}",
                                 param="messages") from exc
        except (TypeError, ValueError, AttributeError) as exc:
            raise InvalidRequest(f"chat template {self.source} failed on these messages: {exc}",
                                 param="messages") from exc
