"""The one place where errors become HTTP: OpenAI's envelope and a status code.

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

* :class:`server.errors.QhxError` subclasses map by class (their ``status_code``, ``error_type``,
  ``code``, ``param``); :class:`~server.errors.Overloaded` and
  :class:`~server.errors.NoPhoneAvailable` add ``Retry-After``,
  :class:`~server.errors.AuthenticationFailed` ``WWW-Authenticate: Bearer``.
* Request validation errors (wrong types, out-of-range values, malformed JSON) are 400 naming the
  parameter, as OpenAI answers them; never FastAPI's 422.
* Unknown routes and methods keep their status (404, 405) in the envelope.
* Anything else is a 500 with a generic message; the details go to the log only.

Streams use the same mapping for their final ``data: {"error": ...}`` event (``error_body``).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import AuthenticationFailed, NoPhoneAvailable, Overloaded, QhxError

logger = logging.getLogger(__name__)

GENERIC_500 = "The server had an error while processing your request. Sorry about that!"
INVALID_JSON = (
    "We could not parse the JSON body of your request. The API expects a JSON payload, but what was "
    "sent was not valid JSON."
)
# pydantic puts union members and validator names in ``loc``; they are not parameter names
_LOC_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def _envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, envelope, extra headers) for any exception."""
    if isinstance(exc, QhxError):
        headers = {}
        if isinstance(exc, (Overloaded, NoPhoneAvailable)):
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
            # the openai clients prefer this one: the pool's estimate unrounded
            headers["retry-after-ms"] = str(max(1, round(exc.retry_after * 1000)))
        elif isinstance(exc, AuthenticationFailed):
            headers["WWW-Authenticate"] = "Bearer"
        return exc.status_code, _envelope(exc.message, exc.error_type, exc.param, exc.code), headers
    if isinstance(exc, RequestValidationError):
        return 400, _validation_envelope(exc), {}
    if isinstance(exc, StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return exc.status_code, _envelope(str(exc.detail), kind), dict(exc.headers or {})
    return 500, _envelope(GENERIC_500, "server_error"), {}


def _param(loc: tuple[Any, ...]) -> str | None:
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] in ("body", "query") else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif isinstance(item, str) and item not in _LOC_TAGS and "[" not in item and not item[:1].isupper():
            parts.append(("." if parts else "") + item)
    return "".join(parts) or None


def _validation_envelope(exc: RequestValidationError) -> dict[str, Any]:
    errors = list(exc.errors())
    if not errors:
        return _envelope("Invalid request.", "invalid_request_error")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return _envelope(INVALID_JSON, "invalid_request_error")
    loc = tuple(first.get("loc", ()))
    param = _param(loc)
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'." if param else "A JSON request body is required."
        return _envelope(message, "invalid_request_error", param, "missing_required_parameter")
    msg = str(first.get("msg", "invalid value"))
    received = first.get("input")
    shown = repr(received) if not isinstance(received, (dict, list)) else type(received).__name__
    if len(shown) > 80:
        shown = shown[:77] + "..."
    message = f"Invalid value for '{param}': {msg} (got {shown})." if param else f"Invalid request body: {msg}."
    return _envelope(message, "invalid_request_error", param, "invalid_value")


def error_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    status, body, headers = error_body(exc)
    if status >= 500:
        logger.error("request %s: %s %s", request_id, type(exc).__name__, getattr(exc, "message", exc))
    return JSONResponse(body, status_code=status, headers=headers)


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    response = error_response(exc, getattr(request.state, "request_id", None))
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 405 and (allowed := _allowed(request)):
        response.headers["Allow"] = allowed
    return response


def _allowed(request: Request) -> str:
    """Every method the path serves: Starlette's ``Allow`` names only the first route that matched
    the path (GET /v1/responses/{id} hid its DELETE)."""
    methods: set[str] = set()
    for route in getattr(request.app.state, "routes", []):
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE and isinstance(route, Route) and route.methods:
            methods |= route.methods
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(QhxError, _handle)
    app.add_exception_handler(RequestValidationError, _handle)
    app.add_exception_handler(StarletteHTTPException, _handle)
    app.add_middleware(CatchAllMiddleware)


class CatchAllMiddleware:
    """Turns an unexpected exception into the 500 envelope (logged with its traceback) instead of
    Starlette's plain-text 500; once a response has started it can only be logged."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            request_id = scope.get("state", {}).get("request_id")
            logger.exception("request %s: unhandled error", request_id)
            if started:
                raise
            status, body, headers = error_body(exc)
            await JSONResponse(body, status_code=status, headers=headers)(scope, receive, send)
