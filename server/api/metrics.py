"""The app's metrics registry and the HTTP metrics, named as prometheus-fastapi-instrumentator names
them (vLLM serves those)::

    http_requests_total{handler, method, status}          counter
    http_request_duration_seconds{handler, method}        histogram, until the response ends (streams too)

``handler`` is the route template (``/v1/models/{model:path}``), ``none`` for paths no route
matches, so that a scan of random paths cannot grow the label set. ``status`` is the code itself
(``401``, ``429``), where the instrumentator's default groups them (``4xx``).

Each app has its own ``CollectorRegistry`` (tests build several apps); the ``qhx:`` request metrics
(:mod:`server.serving.metrics`) and the process collectors live in it too. ``GET /metrics`` serves it
(server/api/routes/metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.backends.base import Backend

UNMATCHED = "none"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def new_registry() -> CollectorRegistry:
    """A registry with the process, platform and GC collectors the default one has."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class HttpMetrics:
    """The HTTP metrics of one app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("http_requests", "Total number of requests by method, status and handler.",
                                ("handler", "method", "status"), registry=registry)
        self.duration = Histogram("http_request_duration_seconds", "Duration of HTTP requests in seconds.",
                                  ("handler", "method"), buckets=DURATION_BUCKETS, registry=registry)


class HttpMetricsMiddleware:
    """Counts and times every HTTP request, by route template.

    ``routes``: the app's routes, flat (each with a ``path`` template). The template is found by
    matching them here, before the app runs, rather than read from ``scope["route"]`` after: a
    request answered before routing (401, CORS preflight) never gets one, and recent FastAPI nests
    included routers in wrappers without a ``path``."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler, method = _handler(self.routes, scope), scope["method"]
        status = 500
        t0 = time.perf_counter()

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            self.metrics.requests.labels(handler, method, str(status)).inc()
            self.metrics.duration.labels(handler, method).observe(time.perf_counter() - t0)


def _handler(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The template of the route the path belongs to, whatever the method."""
    partial = UNMATCHED
    for route in routes:
        match, _child = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", UNMATCHED))
        if match is Match.PARTIAL and partial == UNMATCHED:  # the path, another method (405)
            partial = str(getattr(route, "path", UNMATCHED))
    return partial


class PhoneHealthCollector(Collector):
    """Each phone's health, read from the backend per scrape (labelled ``phone``, its serial, as the
    ``qhx:`` request metrics are); a value the phone has not reported is left out, not zero, and so is
    every gauge of a phone that is not read (unplugged: its readings are forgotten)::

        qhx:phone_temperature_celsius          its skin temperature (else battery, else hottest sensor)
        qhx:phone_thermal_status               Android's 0 NONE .. 3 SEVERE .. 6 SHUTDOWN
        qhx:phone_battery_level_percent
        qhx:phone_battery_charging             1 charging, 0 not
        qhx:phone_decode_tokens_per_second     measured over its recent requests (decode_rate_window_s)
        qhx:phone_drained                      1 while it gets no new requests (too hot, low battery)
    """

    GAUGES = (
        ("qhx:phone_temperature_celsius", "Phone temperature (skin sensor), Celsius.", "temperature_c"),
        ("qhx:phone_thermal_status", "Android thermal status: 0 NONE .. 3 SEVERE .. 6 SHUTDOWN.", "thermal_status"),
        ("qhx:phone_battery_level_percent", "Phone battery level, percent.", "battery_level"),
        ("qhx:phone_battery_charging", "1 while the phone's battery charges.", "charging"),
        ("qhx:phone_decode_tokens_per_second", "Decode rate measured over the phone's recent requests.",
         "decode_tps"),
    )

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def collect(self) -> Iterable[Metric]:
        phones = self._backend.health()
        families = []
        for name, doc, attr in self.GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["phone"])
            for h in phones:
                value = getattr(h, attr)
                if value is not None:
                    family.add_metric([h.serial], float(value))
            families.append(family)
        drained = GaugeMetricFamily("qhx:phone_drained", "1 while the phone gets no new requests (too hot, "
                                    "low battery).", labels=["phone"])
        for h in phones:  # while it is read, as the others: a phone that left takes its gauges along
            if h.drained or h.telemetry_age_s is not None:
                drained.add_metric([h.serial], 1.0 if h.drained else 0.0)
        return [*families, drained]

    def describe(self) -> Iterable[Metric]:
        # without it, registering would call collect() (and the backend) once at start
        return [GaugeMetricFamily(name, "", labels=["phone"]) for name, _, _ in self.GAUGES] + [
            GaugeMetricFamily("qhx:phone_drained", "", labels=["phone"])]
