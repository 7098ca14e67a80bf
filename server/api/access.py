"""The request id, the request's log context and its one access line.

Every request gets an id: the client's ``X-Request-ID`` when it sends a sane one, else ``req-<hex>``.
It is returned in the ``X-Request-ID`` response header, kept in ``request.state.request_id``, and put
on every log line written while the request runs (:func:`server.logs.request_context`). When the
response is over, one line on the ``server.api.access`` logger sums the request up::

    POST /v1/completions 200 532 ms id=cmpl-... model=qwen3.5-0.8b phone=R5CW... prompt_tokens=12
    reused=0 completion_tokens=16 finish_reason=length queue_ms=0.4 ttft_ms=61.2 prefill_ms=55.0
    decode_ms=410.3

(model onwards only when the request generated; the serving layer fills them in: ``reused`` is the
prompt tokens the phone did not process again, as ``usage.prompt_tokens_details.cached_tokens``, and
a chat that dropped its oldest turns to fit the context adds ``dropped=N``, the messages dropped).
In JSON the same values are fields of the object. Probes and scrapes (/health, /ready, /metrics) are logged at debug
level, so that they do not drown the rest (but a 401 there at info).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.logs import FIELDS, request_context

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
QUIET_PATHS = frozenset({"/health", "/ready", "/metrics"})


class RequestIdMiddleware:
    """Request id in and out, log context around the request, and its access line at the end."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = given if given and _CLIENT_REQUEST_ID.match(given) else f"req-{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode("latin-1"))
        status = 500  # when the app fails before answering, the server's error middleware says 500
        t0 = time.monotonic()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        with request_context(request_id) as fields:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                _access_line(scope, status, (time.monotonic() - t0) * 1000.0, fields)


def _access_line(scope: Scope, status: int, total_ms: float, generation: dict[str, Any]) -> None:
    path = scope["path"]
    # a probe's 503 while phones load is expected; a scraper without its key is worth seeing
    level = logging.DEBUG if path in QUIET_PATHS and status not in (401, 403) else logging.INFO
    if not logger.isEnabledFor(level):
        return
    client = scope.get("client")
    fields: dict[str, Any] = {
        "method": scope["method"], "path": path, "status": status, "total_ms": round(total_ms, 1),
        "client": client[0] if client else None, **generation,
    }
    detail = " ".join(f"{k}={v}" for k, v in generation.items() if v is not None)
    logger.log(level, "%s %s %d %.0f ms%s", scope["method"], path, status, total_ms, " " + detail if detail else "",
               extra={FIELDS: fields})
