"""The FastAPI application: ``create_app(settings)``.

State lives on ``app.state`` and is built in the lifespan (no module globals):

    settings     Settings
    backend      Backend (the phone pool)
    models       ModelRegistry (served models, host tokenizers)
    completions  CompletionService

With ``backend=None`` (production) the lifespan builds the pool with
``server.scheduling.pool.build_backend(settings)`` (a started Backend) and closes it at shutdown; a
backend passed in belongs to the caller, who closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import install_error_handlers
from server.api.routes import chat, completions, health, models, tokenize
from server.backends.base import Backend
from server.serving.completions import CompletionService
from server.serving.models import ModelRegistry
from server.settings import Settings

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


def create_app(settings: Settings, *, backend: Backend | None = None) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = backend is None
        if backend is None:
            from server.scheduling.pool import build_backend

            the_backend: Backend = await build_backend(settings)
        else:
            the_backend = backend
        registry = ModelRegistry(the_backend)
        app.state.settings = settings
        app.state.backend = the_backend
        app.state.models = registry
        app.state.completions = CompletionService(the_backend, registry)
        warm = asyncio.get_running_loop().create_task(registry.keep_warm(), name="warm-tokenizers")
        try:
            yield
        finally:
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            await registry.aclose()
            if owned:
                await the_backend.aclose()

    app = FastAPI(title="qhx-server", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response, errors included, carries it
    app.include_router(completions.router)
    app.include_router(chat.router)
    app.include_router(tokenize.router)
    app.include_router(models.router)
    app.include_router(health.router)
    return app


class RequestIdMiddleware:
    """Gives every request an id (the client's ``X-Request-ID`` when it sends a sane one), keeps it in
    ``request.state.request_id`` for logs and returns it in the ``X-Request-ID`` response header."""

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

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)
