"""The last few hundred API requests, in memory: ``GET /v1/requests`` and the console's requests view.

:class:`RecentRequestsMiddleware` records every POST (the generation endpoints, tokenize ...) that
got past the API key check into a :class:`RecentRequests` ring of ``Settings.requests_log_size``
entries: one entry per request, put in when it arrives (``outcome`` ``running``) and completed when
its response is over, from the same fields as its access line (server/api/access.py: the serving
layer notes model, phone, token counts and timings with ``server.logs.note_generation``)::

    {"request_id": "req-...", "id": "chatcmpl-...", "created": 1767225600.1, "method": "POST",
     "endpoint": "/v1/chat/completions", "status": 200, "outcome": "ok", "model": "qwen3.5-0.8b",
     "phone": "127.0.0.1:40001", "prompt_tokens": 21, "cached_tokens": 0, "completion_tokens": 16,
     "finish_reason": "length", "queue_ms": 0.4, "ttft_ms": 61.2, "duration_ms": 532.0,
     "error": null, "error_code": null}

``outcome``: ``running``; ``ok``; ``cancelled`` (the client went away before the end: the console's
stop button); ``error`` (a status >= 400, or a stream that ended with an error event; ``error`` holds
its message). Nothing of the prompt or the reply is kept.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.logs import current_fields

Outcome = Literal["running", "ok", "cancelled", "error"]
OUTCOMES: tuple[Outcome, ...] = ("running", "ok", "cancelled", "error")
ERROR_BODY_MAX = 8192  # bytes of an error body read for its message
ENDPOINT_MAX = 200  # characters of a path kept (a POST to a long unknown path is recorded too)
ERROR_MAX = 1000  # characters of an error message kept
_STREAM_ERROR = b'data: {"error"'


@dataclass(slots=True)
class RequestRecord:
    """One request as the requests view shows it (see the module docstring)."""

    request_id: str
    created: float  # unix time it arrived
    method: str
    endpoint: str
    id: str | None = None  # the response's id (cmpl-..., chatcmpl-...)
    status: int | None = None  # HTTP status; None while nothing was sent
    outcome: Outcome = "running"
    model: str | None = None
    phone: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    queue_ms: float | None = None
    ttft_ms: float | None = None
    duration_ms: float | None = None
    error: str | None = None
    error_code: str | None = None

    def finish(self, status: int, duration_ms: float, fields: dict[str, Any], error: dict[str, Any] | None) -> None:
        self.status = status
        self.duration_ms = round(duration_ms, 1)
        self.id = fields.get("id")
        self.model = fields.get("model")
        self.phone = fields.get("phone")
        self.prompt_tokens = fields.get("prompt_tokens")
        self.cached_tokens = fields.get("reused")
        self.completion_tokens = fields.get("completion_tokens")
        self.finish_reason = fields.get("finish_reason")
        self.queue_ms = fields.get("queue_ms")
        self.ttft_ms = fields.get("ttft_ms")
        if error is not None:
            message = str(error.get("message") or "error")
            self.error = message if len(message) <= ERROR_MAX else f"{message[:ERROR_MAX - 1]}…"
            self.error_code = error.get("code") if isinstance(error.get("code"), str) else None
        if error is not None or status >= 400 or self.finish_reason == "error":
            self.outcome = "error"
        elif status == 499 or self.finish_reason == "abort":
            self.outcome = "cancelled"
        else:
            self.outcome = "ok"


class RecentRequests:
    """A ring of the last ``size`` requests, newest last."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ring: collections.deque[RequestRecord] = collections.deque(maxlen=size)

    def add(self, record: RequestRecord) -> None:
        if self.size:
            self._ring.append(record)

    def query(self, *, phone: str | None = None, status: str | None = None, limit: int | None = None) -> list[
            dict[str, Any]]:
        """Newest first; ``phone`` a serial; ``status`` an outcome (``running`` ``ok`` ``cancelled``
        ``error``) or an HTTP status code."""
        picked: Iterable[RequestRecord] = reversed(self._ring)
        if phone is not None:
            picked = (r for r in picked if r.phone == phone)
        if status is not None:
            picked = (r for r in picked if _matches(r, status))
        out: list[dict[str, Any]] = []
        for r in picked:
            if limit is not None and len(out) >= limit:
                break
            out.append(asdict(r))
        return out


def _matches(record: RequestRecord, status: str) -> bool:
    return record.outcome == status if status in OUTCOMES else str(record.status) == status


def valid_status_filter(status: str) -> bool:
    return status in OUTCOMES or (status.isascii() and status.isdigit() and 100 <= int(status) <= 599)


class RecentRequestsMiddleware:
    """Records each POST into ``recent`` (inside the request id's context, so that it sees the fields
    the serving layer notes; inside the API key check, so that strangers cannot fill the ring). POSTs
    to ``skip`` (the paths open without a key: the console's page, probes, docs) are not recorded:
    they pass the key check, and anyone could push every real request out of the ring with them."""

    def __init__(self, app: ASGIApp, recent: RecentRequests, skip: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.recent = recent
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self.recent.size or _path(scope) in self.skip:
            await self.app(scope, receive, send)
            return
        request_id = str(scope.get("state", {}).get("request_id") or "-")
        record = RequestRecord(request_id, time.time(), scope["method"], scope["path"][:ENDPOINT_MAX])
        self.recent.add(record)
        t0 = time.monotonic()
        status = 500  # the app failed before answering: the catch-all answers 500
        error_body = bytearray()
        error: dict[str, Any] | None = None

        async def recording_send(message: Message) -> None:
            nonlocal status, error
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if status >= 400 and len(error_body) < ERROR_BODY_MAX:
                    error_body.extend(body[: ERROR_BODY_MAX - len(error_body)])
                elif error is None and body.startswith(_STREAM_ERROR):
                    error = error_in(body[len(b"data: "):])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            if status >= 400 and error is None:
                error = error_in(bytes(error_body)) or {"message": f"HTTP {status}"}
            record.finish(status, (time.monotonic() - t0) * 1000.0, current_fields() or {}, error)


def _path(scope: Scope) -> str:
    """The path as the routes see it (without the root path a proxy mounts the server under)."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def error_in(body: bytes) -> dict[str, Any] | None:
    """The ``error`` object of an OpenAI error envelope, or None. A body cut short (only its first
    ``ERROR_BODY_MAX`` bytes are read: a 404 may name a model of any length) gives the beginning of its
    message, ending with "…"."""
    try:
        parsed = json.loads(body.split(b"\n\n", 1)[0])
    except ValueError:  # UnicodeDecodeError included
        return _cut_error(body)
    err = parsed.get("error") if isinstance(parsed, dict) else None
    return err if isinstance(err, dict) else None


# the message comes first in the server's envelope (server/api/errors.py)
_MESSAGE_START = re.compile(rb'\s*\{\s*"error"\s*:\s*\{\s*"message"\s*:\s*"((?:[^"\\]|\\.)*)')


def _cut_error(body: bytes) -> dict[str, Any] | None:
    found = _MESSAGE_START.match(body)
    if found is None:
        return None
    text = found.group(1)
    for drop in range(8):  # an escape (\uXXXX) or a UTF-8 character cut in the middle: drop its start
        try:
            message = json.loads(b'"' + text[: len(text) - drop] + b'"')
        except ValueError:
            continue
        if message and "\ud800" <= message[-1] <= "\udbff":  # half of a pair of \u escapes
            message = message[:-1]
        return {"message": f"{message}…"}
    return None
