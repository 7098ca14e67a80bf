"""The FastAPI application: ``create_app(settings)``.

State lives on ``app.state`` and is built in the lifespan (no module globals):

    settings          Settings
    backend           Backend (the phone pool)
    models            ModelRegistry (served models, host tokenizers)
    completions       CompletionService
    metrics_registry  the app's prometheus CollectorRegistry (built with the app: the HTTP metrics
                      middleware records into it), served at /metrics
    serving_metrics   ServingMetrics (the ``qhx:`` request metrics, in that registry)

Middleware, outermost first: request id + log context + access line (server/api/access.py), HTTP
metrics, CORS (only with ``Settings.cors_origins``), API keys (only with ``Settings.api_keys``), the
catch-all 500. So a 401 or a preflight still gets its request id, its access line and its count.

With ``backend=None`` (production) the lifespan builds the pool with
``server.scheduling.pool.build_backend(settings)`` (a started Backend) and closes it at shutdown; a
backend passed in belongs to the caller, who closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route

from server.api.access import REQUEST_ID_HEADER, RequestIdMiddleware
from server.api.auth import ApiKeyMiddleware, open_paths, warn_if_exposed
from server.api.errors import install_error_handlers
from server.api.metrics import HttpMetrics, HttpMetricsMiddleware, new_registry
from server.api.routes import chat, completions, health, metrics, models, tokenize
from server.backends.base import Backend
from server.serving.chat.overflow import DROPPED_HEADER
from server.serving.chat.service import ChatService
from server.serving.completions import CompletionService
from server.serving.metrics import BackendCollector, ServingMetrics
from server.serving.models import ModelRegistry
from server.serving.oneshot import IGNORED_HEADER
from server.settings import Settings

logger = logging.getLogger(__name__)


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
        app.state.completions = CompletionService(the_backend, registry, metrics=serving_metrics)
        app.state.chat = ChatService(the_backend, registry, metrics=serving_metrics,
                                     context_overflow=settings.context_overflow,
                                     history_render=settings.history_render)
        gauges = BackendCollector(the_backend)
        metrics_registry.register(gauges)
        warn_if_exposed(settings)
        warm = asyncio.get_running_loop().create_task(registry.keep_warm(), name="warm-tokenizers")
        try:
            yield
        finally:
            metrics_registry.unregister(gauges)
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            await registry.aclose()
            if owned:
                await the_backend.aclose()

    app = FastAPI(title="qhx-server", version="0.1.0", lifespan=lifespan)
    metrics_registry = app.state.metrics_registry = new_registry()
    serving_metrics = app.state.serving_metrics = ServingMetrics(metrics_registry)
    # add_middleware puts each one outside those added before it
    install_error_handlers(app)
    if settings.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, open_paths=open_paths(settings))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=[REQUEST_ID_HEADER, "Retry-After", IGNORED_HEADER, DROPPED_HEADER])
    routers = [completions.router, chat.router, tokenize.router, models.router, health.router, metrics.router]
    for router in routers:
        app.include_router(router)
    # the HTTP metrics label requests with route templates: FastAPI's own (docs) and ours, flat
    routes = [r for r in app.router.routes if isinstance(r, Route)] + [r for rt in routers for r in rt.routes]
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(metrics_registry), routes=routes)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response, errors included, carries the id
    return app

