"""Liveness, readiness and the phone list.

``/health`` answers 200 while the process lives (a liveness probe must not fail while phones load);
``/ready`` answers 503 until at least one phone is ready (pain point 6 of openai-servers.md), and
again once the server is shutting down (``"status": "draining"``: load balancers stop sending).
A phone *drained* for its health (too hot, low battery: docs/capacity.md) is not ready: it takes no
new request, so with every phone drained ``/ready`` is 503 ``not_ready`` (``phones_drained`` counts
them; requests sent anyway wait in the queue for one to recover), as while they are quarantined.
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


_READY = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["status", "phones_ready", "phones"],
    "properties": {"status": {"enum": ["ready", "not_ready", "draining"]}, "phones_ready": {"type": "integer"},
                   "phones_drained": {"type": "integer"},
                   "phones": {"type": "array", "items": {"type": "object"}}}}}}}


@router.get("/ready", responses={200: {"description": "At least one phone is ready (and not drained).", **_READY},
                                 503: {"description": "No phone is ready (yet, or every one is drained), or the "
                                                      "server is shutting down (status draining); the same body.",
                                                      **_READY}})
async def ready(request: Request) -> JSONResponse:
    phones = _phones(request)
    serving = [p for p in phones if p["state"] in (PhoneState.READY.value, PhoneState.BUSY.value)]
    n_drained = sum(p.get("drained") is not None for p in serving)
    n_ready = len(serving) - n_drained
    drain = getattr(request.app.state, "drain", None)
    status = "draining" if drain is not None and drain.draining else "ready" if n_ready else "not_ready"
    return JSONResponse({"status": status, "phones_ready": n_ready, "phones_drained": n_drained, "phones": phones},
                        status_code=200 if status == "ready" else 503)


@router.get("/v1/devices")
async def devices(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": _phones(request)}
