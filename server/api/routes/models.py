"""GET /v1/models and /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.serving.models import ModelRegistry
from server.serving.protocol import ModelCard, ModelList

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    registry: ModelRegistry = request.app.state.models
    return ModelList(data=[registry.card(info) for info in registry.models()])


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> ModelCard:
    registry: ModelRegistry = request.app.state.models
    return registry.card(registry.resolve(model))
