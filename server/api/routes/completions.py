"""POST /v1/completions."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.api.openapi import generation_responses
from server.api.sse import respond
from server.serving.completions import CompletionService
from server.serving.oneshot import ignored_header
from server.serving.protocol import Completion, CompletionRequest

logger = logging.getLogger(__name__)
router = APIRouter()


@router.post("/v1/completions", responses=generation_responses(Completion, Completion))
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    service: CompletionService = request.app.state.completions
    prepared = await service.prepare(body)
    request_id = request.state.request_id
    logger.debug("request %s is %s (model %s, %d prompt tokens, max %d new, stream %s)", request_id,
                 prepared.id, prepared.model, len(prepared.params.prompt_ids), prepared.params.max_new,
                 bool(body.stream))
    headers = ignored_header(prepared.ignored)
    return await respond(request, service, prepared, stream=bool(body.stream), request_id=prepared.id,
                         headers=headers)

