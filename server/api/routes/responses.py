"""POST /v1/responses, GET and DELETE /v1/responses/{response_id}."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from starlette.responses import Response

from server.api.sse import respond
from server.errors import UnsupportedParameter
from server.serving.chat.overflow import dropped_header
from server.serving.oneshot import ignored_header
from server.serving.responses.protocol import ResponsesRequest
from server.serving.responses.service import ResponsesService

logger = logging.getLogger(__name__)
router = APIRouter()


def responses_service(request: Request) -> ResponsesService:
    """The app's ResponsesService, built in the lifespan."""
    service: ResponsesService = request.app.state.responses
    return service


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    service = responses_service(request)
    prepared = await service.prepare(body)
    logger.debug(  # the access line (server/api/access.py) is the request's info-level line
        "request %s is %s (model %s, %d prompt tokens, max %d new, tools %d, thinking %s, previous %s, "
        "stream %s)", request.state.request_id, prepared.id, prepared.model, len(prepared.params.prompt_ids),
        prepared.params.max_new, len(body.tools or []), prepared.prompt.thinking, body.previous_response_id,
        bool(body.stream),
    )
    headers = ignored_header(prepared.ignored) | dropped_header(prepared.prompt.dropped)
    return await respond(request, service, prepared, stream=bool(body.stream), request_id=prepared.id,
                         headers=headers, typed=True)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> Response:
    if request.query_params.get("stream", "false").lower() not in ("false", "0"):
        raise UnsupportedParameter("Streaming a stored response again is not supported; retrieve it whole.",
                                   param="stream")
    return Response(responses_service(request).retrieve(response_id), media_type="application/json")


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> Response:
    return Response(responses_service(request).delete(response_id), media_type="application/json")
