"""The FastAPI application: ``create_app(settings)``.

State lives on ``app.state`` and is built in the lifespan (no module globals):

    settings          Settings
    backend           Backend (the phone pool)
    models            ModelRegistry (served models, host tokenizers)
    completions       CompletionService
    responses         ResponsesService (and its in-memory ResponseStore: stored responses)
    metrics_registry  the app's prometheus CollectorRegistry (built with the app: the HTTP metrics
                      middleware records into it), served at /metrics
    serving_metrics   ServingMetrics (the ``qhx:`` request metrics, in that registry)
    drain             Drain (graceful shutdown: server/api/shutdown.py; server/serve.py wires the signals)
    routes            every route, flat (the HTTP metrics' templates, a 405's ``Allow``)
    recent_requests   RecentRequests (the last requests, GET /v1/requests; built with the app)
    device_watch      DeviceWatch (the farm's snapshots, GET /v1/devices/events)

Middleware, outermost first: request id + log context + access line (server/api/access.py), HTTP
metrics, CORS (only with ``Settings.cors_origins``), API keys (only with ``Settings.api_keys``), the
recent requests ring (server/api/recent.py), the drain (server/api/shutdown.py), request bodies
(server/api/bodies.py), the catch-all 500. So a 401 or a preflight still gets its request id, its
access line and its count. The app itself is :class:`server.api.connection.App`: FastAPI, keeping
each request's transport (to bound a stream's buffers and drop a client that stopped reading).

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

from server.api import console
from server.api.access import REQUEST_ID_HEADER, RequestIdMiddleware
from server.api.auth import ApiKeyMiddleware, open_paths, warn_if_exposed
from server.api.bodies import BodyGuardMiddleware
from server.api.connection import App
from server.api.devices_watch import DeviceWatch
from server.api.errors import install_error_handlers
from server.api.metrics import HttpMetrics, HttpMetricsMiddleware, PhoneHealthCollector, new_registry
from server.api.openapi import install_openapi
from server.api.recent import RecentRequests, RecentRequestsMiddleware
from server.api.routes import (
    chat,
    completions,
    devices_events,
    health,
    metrics,
    models,
    requests,
    responses,
    tokenize,
)
from server.api.shutdown import Drain, DrainMiddleware
from server.backends.base import Backend
from server.memory import freeze_heap
from server.serving.chat.overflow import DROPPED_HEADER
from server.serving.chat.service import ChatService
from server.serving.completions import CompletionService
from server.serving.metrics import BackendCollector, ServingMetrics
from server.serving.models import ModelRegistry
from server.serving.oneshot import IGNORED_HEADER
from server.serving.responses.service import ResponsesService
from server.serving.responses.store import ResponseStore
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
        app.state.responses = ResponsesService(
            the_backend, registry, app.state.chat, metrics=serving_metrics,
            store=ResponseStore(max_items=settings.responses_store_max, ttl_s=settings.responses_store_ttl_s,
                                max_bytes=settings.responses_store_max_bytes),
        )
        gauges = BackendCollector(the_backend)
        metrics_registry.register(gauges)
        phone_gauges = PhoneHealthCollector(the_backend)
        metrics_registry.register(phone_gauges)
        warn_if_exposed(settings)
        warm = asyncio.get_running_loop().create_task(registry.keep_warm(), name="warm-tokenizers")
        app.state.device_watch = watch = DeviceWatch(the_backend)
        watch.start()
        freeze_heap()  # what start-up built, out of full collections; no request yet (server/memory.py)
        try:
            yield
        finally:
            await watch.aclose()
            metrics_registry.unregister(gauges)
            metrics_registry.unregister(phone_gauges)
            warm.cancel()
            await asyncio.gather(warm, return_exceptions=True)
            await registry.aclose()
            if owned:
                await the_backend.aclose()

    app = App(title="qhx-server", version="0.1.0", lifespan=lifespan)  # FastAPI that sees each transport
    metrics_registry = app.state.metrics_registry = new_registry()
    serving_metrics = app.state.serving_metrics = ServingMetrics(metrics_registry)
    drain = app.state.drain = Drain(settings.shutdown_grace_s)
    recent = app.state.recent_requests = RecentRequests(settings.requests_log_size)
    # add_middleware puts each one outside those added before it
    install_error_handlers(app)
    install_openapi(app)  # /openapi.json documents the error envelope (400, not FastAPI's 422)
    app.add_middleware(BodyGuardMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
                       drain=drain)  # 408/413/415 before any route
    app.add_middleware(DrainMiddleware, drain=drain)  # 503 while shutting down; counts what runs
    # inside the key check, the open paths skipped: only keyed requests are recorded
    app.add_middleware(RecentRequestsMiddleware, recent=recent, skip=open_paths(settings))
    if settings.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys, open_paths=open_paths(settings))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=[REQUEST_ID_HEADER, "Retry-After", IGNORED_HEADER, DROPPED_HEADER])
    routers = [completions.router, chat.router, responses.router, tokenize.router, models.router, health.router, metrics.router,
               devices_events.router, requests.router]
    if settings.console:
        routers.append(console.router)
    for router in routers:
        app.include_router(router)
    # the HTTP metrics label requests with route templates: FastAPI's own (docs) and ours, flat
    routes = app.state.routes = [r for r in app.router.routes if isinstance(r, Route)] + [r for rt in routers for r in rt.routes]
    app.add_middleware(HttpMetricsMiddleware, metrics=HttpMetrics(metrics_registry), routes=routes)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response, errors included, carries the id
    return app

