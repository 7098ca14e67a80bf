"""GET /v1/requests: the last requests, newest first (server/api/recent.py; docs/api.md)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request

from server.api.recent import RecentRequests, valid_status_filter
from server.errors import InvalidRequest

router = APIRouter()


@router.get("/v1/requests")
async def recent_requests(
    request: Request,
    phone: str | None = Query(None, max_length=200),
    status: str | None = Query(None, max_length=20),
    limit: int | None = Query(None, ge=1, le=100_000),
) -> dict[str, Any]:
    recent: RecentRequests = request.app.state.recent_requests
    if status is not None and not valid_status_filter(status):
        raise InvalidRequest(
            f"Invalid value for 'status': {status!r} is not one of running, ok, cancelled, error or an "
            "HTTP status code.", param="status",
        )
    data = recent.query(phone=phone or None, status=status, limit=limit)
    return {"object": "list", "data": data, "size": recent.size}
