"""The OpenAPI document says what the server really answers (``GET /openapi.json``).

FastAPI documents a ``422`` validation error nobody gets (server/api/errors.py answers 400) and no
error at all otherwise. :func:`install_openapi` rewrites every operation's responses once, for every
route, ours or added later: ``422`` goes, ``4XX`` and ``5XX`` are OpenAI's error envelope
(:class:`~server.serving.protocol.ErrorResponse`), except where a route documents a code itself
(``/ready``'s 503 has its own body). The fuzz tests (tests/api/test_fuzz.py) hold the server to it.

Routes document their own successes; :func:`generation_responses` is the 200 of an endpoint that
answers a JSON body or, with ``stream: true``, server-sent events.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from server.serving.chat.protocol import ChatCompletionChunk
from server.serving.protocol import Completion, ErrorResponse

_SCHEMAS = "#/components/schemas/"
_ERROR_REF = {"$ref": f"{_SCHEMAS}ErrorResponse"}
# the chunk models of streams (a completion's chunks have the completion's own shape)
STREAM_CHUNKS: tuple[type[BaseModel], ...] = (Completion, ChatCompletionChunk)
_ERRORS = {
    "4XX": "A client error, in OpenAI's error envelope.",
    "5XX": "A server or phone error, in OpenAI's error envelope (never a bare 500 page).",
}


def generation_responses(body: type[BaseModel], chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """The 200 of a generating endpoint: ``body`` as JSON, or with ``stream: true`` server-sent events,
    each ``data`` a ``chunk`` (JSON), ``[DONE]`` or an error envelope (``chunk`` must be one of
    :data:`STREAM_CHUNKS`, whose schemas :func:`install_openapi` adds)."""
    if chunk not in STREAM_CHUNKS:
        raise ValueError(f"{chunk.__name__} is not in STREAM_CHUNKS")
    payload = {"anyOf": [{"$ref": f"{_SCHEMAS}{chunk.__name__}"}, _ERROR_REF]}
    event = {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
    ]}}}
    return {200: {
        "model": body,
        "description": "The whole response (JSON), or with `stream: true` server-sent events (each described "
                       "here): `data: {chunk}` events, then `data: [DONE]`, or a last `data: {\"error\": ...}` "
                       "when the request fails mid-stream.",
        "content": {"text/event-stream": {"schema": event}},
    }}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` document the error envelope on every operation (module docstring)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            models: tuple[type[BaseModel], ...] = (ErrorResponse, *STREAM_CHUNKS)
            for model in models:
                model_schema = model.model_json_schema(ref_template=_SCHEMAS + "{model}", mode="serialization")
                schemas.update(model_schema.pop("$defs", {}))
                schemas.setdefault(model.__name__, model_schema)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    _document_errors(operation.setdefault("responses", {}))
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_errors(responses: dict[str, Any]) -> None:
    responses.pop("422", None)
    for code, description in _ERRORS.items():
        responses.setdefault(code, {"description": description,
                                    "content": {"application/json": {"schema": _ERROR_REF}}})
