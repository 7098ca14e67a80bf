"""API keys: ``Authorization: Bearer <key>``, checked before anything else runs.

With ``Settings.api_keys`` empty there is no authentication. Otherwise every path needs one of the
keys except the open ones: ``/health`` and ``/ready`` (probes), the OpenAPI docs, ``/metrics``
unless ``Settings.metrics_require_key``, and the console's page and files (``Settings.console``: they
hold no data, the console asks for a key). Closed by default, so a route added later is protected
without anyone remembering to. A missing or wrong key is a 401 in OpenAI's envelope
(:class:`server.errors.AuthenticationFailed` through :func:`server.api.errors.error_response`).

Keys are compared in constant time, all of them every time: SHA-256 digests (equal lengths, so
not even the key's length leaks) through ``hmac.compare_digest``. CORS preflights never get here (the
CORS middleware answers them first), so browsers can call a keyed server.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.console import PATHS as CONSOLE_PATHS
from server.api.errors import error_response
from server.errors import AuthenticationFailed
from server.settings import Settings

logger = logging.getLogger(__name__)

ALWAYS_OPEN = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
WRONG_KEY = "Incorrect API key provided."


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeyMiddleware:
    """401 unless the request carries one of ``keys`` as a Bearer token (or its path is open)."""

    def __init__(self, app: ASGIApp, keys: list[str], open_paths: frozenset[str]) -> None:
        self.app = app
        self._digests = [_digest(k) for k in keys]
        self._open = open_paths

    def _accepts(self, token: str) -> bool:
        given = _digest(token)
        ok = False
        for key in self._digests:  # no early exit: the time does not say which key matched
            ok |= hmac.compare_digest(given, key)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) in self._open:
            await self.app(scope, receive, send)
            return
        token = _bearer_token(scope)
        if token is not None and self._accepts(token):
            await self.app(scope, receive, send)
            return
        exc = AuthenticationFailed(MISSING_KEY if token is None else WRONG_KEY)
        await error_response(exc, scope.get("state", {}).get("request_id"))(scope, receive, send)


def open_paths(settings: Settings) -> frozenset[str]:
    paths = ALWAYS_OPEN if settings.metrics_require_key else ALWAYS_OPEN | {"/metrics"}
    if settings.console:  # the console's page and files hold no data; it asks for a key to read any
        paths |= CONSOLE_PATHS
    return paths


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            return token.strip() or None if scheme.lower() == "bearer" else None
    return None


def warn_if_exposed(settings: Settings) -> bool:
    """Warn when the server binds beyond loopback with no API key; returns whether it warned."""
    if settings.api_keys or _is_loopback(settings.host):
        return False
    logger.warning(
        "listening on %s without an API key: anyone who reaches port %d can use the phones; set "
        "--api-key (QHX_API_KEYS) or bind 127.0.0.1", settings.host, settings.port,
    )
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may well resolve beyond loopback
