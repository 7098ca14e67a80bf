"""Quoting for the phone's shell, and the launch command template.

adbd runs every `shell:` service string as ``/system/bin/sh -c <string>`` (v1 and v2 alike), so the
string we send is parsed by a POSIX shell exactly once. Every value we put into it is quoted with
POSIX single quotes: inside ``'...'`` the shell interprets nothing at all (no ``$``, backquote,
backslash, glob, newline or ``;`` handling); the only character that cannot appear is ``'`` itself,
which becomes ``'\\''`` (close the quote, an escaped quote, reopen). NUL cannot be carried in an argv
string and is refused.
"""

from __future__ import annotations

import re

from server.errors import InvalidRequest

# words made only of these characters mean the same quoted or not (as shlex.quote, ASCII only)
_SAFE = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")
_PLACEHOLDER = re.compile(r"\{(root|manifest|artifacts|max_new|prompt)\}")
PLACEHOLDERS = ("root", "manifest", "artifacts", "max_new", "prompt")


def sh_quote(value: str) -> str:
    """One shell word that the phone's ``sh`` turns back into exactly ``value``."""
    if "\x00" in value:
        raise InvalidRequest("text containing NUL cannot be passed on a phone command line")
    if value and _SAFE.fullmatch(value):
        return value
    return "'" + value.replace("'", "'\\''") + "'"


def render_launch(template: str, **values: str | int) -> str:
    """Fill the launch command template, shell-quoting every value.

    Only the placeholders ``{root} {manifest} {artifacts} {max_new} {prompt}`` are substituted, in a
    single pass (a value containing ``{prompt}`` is not substituted again); any other brace, such as a
    shell ``${VAR}``, is left alone, so templates need no brace escaping.
    """
    missing = [name for name in PLACEHOLDERS if name not in values]
    if missing:
        raise ValueError(f"launch command values missing: {missing}")
    quoted = {name: sh_quote(str(value)) for name, value in values.items()}
    return _PLACEHOLDER.sub(lambda m: quoted[m.group(1)], template)
