"""POST /v1/chat/completions."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.api.openapi import generation_responses
from server.api.sse import respond
from server.serving.chat.overflow import dropped_header
from server.serving.chat.protocol import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from server.serving.chat.service import ChatService
from server.serving.oneshot import ignored_header

logger = logging.getLogger(__name__)
router = APIRouter()


def chat_service(request: Request) -> ChatService:
    """The app's ChatService, built in the lifespan."""
    service: ChatService = request.app.state.chat
    return service


@router.post("/v1/chat/completions", responses=generation_responses(ChatCompletion, ChatCompletionChunk))
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    service = chat_service(request)
    prepared = await service.prepare(body)
    logger.debug(  # the access line (server/api/access.py) is the request's info-level line
        "request %s is %s (model %s, %d messages, %d prompt tokens, max %d new, tools %d, thinking %s, "
        "stream %s)", request.state.request_id, prepared.id, prepared.model, len(body.messages),
        len(prepared.params.prompt_ids), prepared.params.max_new, len(body.tools or []),
        prepared.prompt.thinking, bool(body.stream),
    )
    headers = ignored_header(prepared.ignored) | dropped_header(prepared.prompt.dropped)
    return await respond(request, service, prepared, stream=bool(body.stream), request_id=prepared.id,
                         headers=headers)
