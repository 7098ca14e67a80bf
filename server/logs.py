"""Logging: one ``configure_logging(settings)`` for ``serve``, and the request's context.

Every log line carries the request id of the HTTP request it was written for (``-`` outside one):
the API layer opens :func:`request_context` for each request, a contextvar holds the id, and
:class:`RequestIdFilter` on the handler copies it onto each record. Tasks started during the request
(the generation pump, the SSE body) inherit the contextvar, so their lines carry it too.

The same context holds the request's *fields* (model, phone, token counts, timings): the serving
layer adds them with :func:`note_generation`, and the API layer writes them on the request's one
access line. Formats (``Settings.log_format``)::

    text  2025-01-01 12:00:00,000 INFO server.api.access [req-1f2e...] POST /v1/completions 200 ...
    json  {"ts": "2025-01-01T12:00:00.000+00:00", "level": "INFO", "logger": "server.api.access",
           "msg": "POST /v1/completions 200 ...", "request_id": "req-1f2e...", "status": 200, ...}
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator
from typing import IO, Any

from server.settings import Settings

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("qhx_request_id", default=None)
_request_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "qhx_request_fields", default=None
)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
# attribute of a LogRecord holding structured fields (``logger.info(..., extra={FIELDS: {...}})``)
FIELDS = "fields"


@contextlib.contextmanager
def request_context(request_id: str) -> Iterator[dict[str, Any]]:
    """The request id and an empty field dict for the code running inside (and its tasks)."""
    fields: dict[str, Any] = {}
    id_token = _request_id.set(request_id)
    fields_token = _request_fields.set(fields)
    try:
        yield fields
    finally:
        _request_fields.reset(fields_token)
        _request_id.reset(id_token)


def current_request_id() -> str | None:
    return _request_id.get()


def current_fields() -> dict[str, Any] | None:
    """The current request's fields (what its access line will say; None outside a request)."""
    return _request_fields.get()


def note_generation(**fields: Any) -> None:
    """Record one generation's fields on the current request (no-op outside a request).

    A request with several generations keeps the first one's fields, sums ``completion_tokens``,
    keeps the fewest ``reused`` (as ``usage`` counts cached tokens) and counts them in
    ``generations``. Fields noted before the first generation (:func:`note_request`) come after its
    fields."""
    current = _request_fields.get()
    if current is None:
        return
    if "id" not in current:  # the first generation (every one notes its id)
        noted = dict(current)
        current.clear()
        current.update(fields, **noted)
        return
    current["generations"] = current.get("generations", 1) + 1
    current["completion_tokens"] = (current.get("completion_tokens") or 0) + (fields.get("completion_tokens") or 0)
    reused = [r for r in (current.get("reused"), fields.get("reused")) if r is not None]
    current["reused"] = min(reused) if reused else None


def note_request(**fields: Any) -> None:
    """Record fields of the request itself (not of one generation) on the current request, for its
    access line: e.g. ``dropped``, the messages a chat dropped to fit the context."""
    current = _request_fields.get()
    if current is not None:
        current.update(fields)


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _request_id.get() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, then the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": _json_request_id(record),
        }
        extra = getattr(record, FIELDS, None)
        if isinstance(extra, dict):
            out.update((k, v) for k, v in extra.items() if k not in out)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _json_request_id(record: logging.LogRecord) -> str | None:
    rid = getattr(record, "request_id", None)  # set by RequestIdFilter ("-" outside a request)
    if rid is None:
        rid = _request_id.get()
    return None if rid == "-" else rid


def make_handler(log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler in the given format, with the request id filter."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT, defaults={"request_id": "-"}))
    handler.addFilter(RequestIdFilter())
    return handler


def configure_logging(settings: Settings, stream: IO[str] | None = None) -> logging.Handler:
    """Route every logger (uvicorn's too: run it with ``log_config=None``) through one root handler in
    ``settings.log_format`` at ``settings.log_level``; replaces the handler a previous call installed."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_qhx", False)]:
        root.removeHandler(old)
    handler = make_handler(settings.log_format, stream)
    handler._qhx = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return handler
