"""Liveness, readiness and the phone list.

``/health`` answers 200 while the process lives (a liveness probe must not fail while phones load);
``/ready`` answers 503 until at least one phone is ready (pain point 6 of openai-servers.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.backends.base import Backend, PhoneHealth, PhoneState

router = APIRouter()


def _phones(request: Request) -> list[dict[str, Any]]:
    backend: Backend = request.app.state.backend
    return [_phone_json(h) for h in backend.health()]


def _phone_json(h: PhoneHealth) -> dict[str, Any]:
    out = dataclasses.asdict(h)
    out["state"] = h.state.value
    return out


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    phones = _phones(request)
    n_ready = sum(p["state"] in (PhoneState.READY.value, PhoneState.BUSY.value) for p in phones)
    status = "ready" if n_ready else "not_ready"
    return JSONResponse({"status": status, "phones_ready": n_ready, "phones": phones},
                        status_code=200 if n_ready else 503)


@router.get("/v1/devices")
async def devices(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _phones(request)}
