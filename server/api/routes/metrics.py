"""GET /metrics: the app's registry (server/api/metrics.py) in the format the scraper asks for
(``Accept``): Prometheus text 0.0.4 by default, OpenMetrics when asked."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client.exposition import choose_encoder
from starlette.responses import Response

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(request.app.state.metrics_registry), headers={"Content-Type": content_type})
