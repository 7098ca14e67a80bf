"""Request metrics with vLLM's names (``vllm:`` becomes ``qhx:``), so its dashboards translate.

Recorded once per generation by :func:`server.serving.driver.generate_text` (both endpoints,
streaming or not) into one app's ``CollectorRegistry``; labels ``model_name`` and ``phone`` (the
serial that ran it)::

    qhx:time_to_first_token_seconds      histogram  request arrival (driver) -> first token on the host
    qhx:inter_token_latency_seconds      histogram  gap between tokens (phone clock; host clock one-shot)
    qhx:e2e_request_latency_seconds      histogram  request arrival (driver) -> end
    qhx:request_queue_time_seconds       histogram  request arrival (driver) -> the phone started it
    qhx:prompt_tokens_total              counter
    qhx:generation_tokens_total          counter
    qhx:prefix_cache_queries_total       counter    prompt tokens of the requests phones started
    qhx:prefix_cache_hits_total          counter    of those, the ones the phone did not process again
                                                    (it still held them: docs/state-reuse.md)
    qhx:request_success_total            counter    + finished_reason: stop | length | abort | error
    qhx:num_requests_running             gauge      per phone, read from the backend at scrape time
    qhx:num_requests_waiting             gauge      per model (no phone), read from the pool

Only requests a phone started are counted (vLLM counts requests its engine took); those refused
before (429, 503, 400) show in ``http_requests_total`` by status. ``abort``: the client went away;
``error``: the phone failed after starting the request (vLLM v1's reasons).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.backends.base import Backend

LABELS = ("model_name", "phone")

# vLLM's buckets (vllm/v1/metrics/loggers.py), so histogram_quantile over them compares
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServingMetrics:
    """The ``qhx:`` request metrics of one app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.ttft = Histogram("qhx:time_to_first_token_seconds", "Time to first token.", LABELS,
                              buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram("qhx:inter_token_latency_seconds", "Time between output tokens.", LABELS,
                             buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("qhx:e2e_request_latency_seconds", "End-to-end request latency.", LABELS,
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.queue = Histogram("qhx:request_queue_time_seconds", "Time waiting for a phone.", LABELS,
                               buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("qhx:prompt_tokens", "Prompt tokens processed.", LABELS, registry=registry)
        self.generation_tokens = Counter("qhx:generation_tokens", "Tokens generated.", LABELS, registry=registry)
        # vLLM's prefix cache counters, in tokens: hits / queries is the share of prompt tokens reused
        self.prefix_queries = Counter("qhx:prefix_cache_queries", "Prefix cache queries, in prompt tokens.", LABELS,
                                      registry=registry)
        self.prefix_hits = Counter("qhx:prefix_cache_hits", "Prefix cache hits, in prompt tokens not processed again.",
                                   LABELS, registry=registry)
        self.success = Counter("qhx:request_success", "Requests finished, by reason.",
                               (*LABELS, "finished_reason"), registry=registry)

    def record(
        self, *, model: str, phone: str, finished_reason: str, prompt_tokens: int, generation_tokens: int,
        queue_s: float | None, ttft_s: float | None, e2e_s: float, token_gaps_s: Sequence[float],
        cached_tokens: int = 0,
    ) -> None:
        """One generation a phone started, whichever way it ended."""
        labels = (model, phone)
        if queue_s is not None:
            self.queue.labels(*labels).observe(queue_s)
        if ttft_s is not None:
            self.ttft.labels(*labels).observe(ttft_s)
        itl = self.itl.labels(*labels)
        for gap in token_gaps_s:
            itl.observe(gap)
        self.e2e.labels(*labels).observe(e2e_s)
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.generation_tokens.labels(*labels).inc(generation_tokens)
        self.prefix_queries.labels(*labels).inc(prompt_tokens)
        self.prefix_hits.labels(*labels).inc(cached_tokens)
        self.success.labels(*labels, finished_reason).inc()


@runtime_checkable
class QueueDepth(Protocol):
    """What the gauges need of a pool beyond the Backend contract (``PhonePool`` provides it)."""

    def queue_depth(self, model: str | None = None) -> int: ...


class BackendCollector(Collector):
    """``qhx:num_requests_running`` / ``qhx:num_requests_waiting``, read from the backend per scrape."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterator[Metric]:
        running = GaugeMetricFamily("qhx:num_requests_running", "Requests running on phones.", labels=LABELS)
        for h in self._backend.health():
            running.add_metric([h.model or "", h.serial], 1.0 if h.request_in_flight else 0.0)
        yield running
        waiting = GaugeMetricFamily("qhx:num_requests_waiting", "Requests waiting for a phone.",
                                    labels=["model_name"])
        if isinstance(self._backend, QueueDepth):
            for info in self._backend.models():
                waiting.add_metric([info.name], float(self._backend.queue_depth(info.name)))
        yield waiting

    def describe(self) -> Iterable[Metric]:
        # without it, registering would call collect() (and the backend) once at start
        return [GaugeMetricFamily("qhx:num_requests_running", "", labels=LABELS),
                GaugeMetricFamily("qhx:num_requests_waiting", "", labels=["model_name"])]
