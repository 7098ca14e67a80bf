"""server/api/errors.py: every error class to its status and envelope (in-process ASGI app)."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from server.api.app import RequestIdMiddleware
from server.api.errors import GENERIC_500, error_body, install_error_handlers
from server.errors import (
    BackendError,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    NoPhoneAvailable,
    Overloaded,
    PhoneLost,
    PhoneStalled,
    QhxError,
    UnsupportedParameter,
)


class Body(BaseModel):
    n: int


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret detail")

    @app.get("/busy")
    async def busy() -> None:
        raise Overloaded("queue full", retry_after=2.4)

    @app.post("/echo")
    async def echo(body: Body) -> Body:
        return body

    return app


async def test_unexpected_exception_is_a_generic_500_envelope_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        with caplog.at_level(logging.ERROR, logger="server.api.errors"):
            r = await client.get("/boom", headers={"X-Request-ID": "abc"})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": GENERIC_500, "type": "server_error", "param": None, "code": None}}
    assert "secret detail" not in r.text
    assert r.headers["x-request-id"] == "abc"
    assert any("abc" in rec.getMessage() and rec.exc_info for rec in caplog.records)


async def test_overloaded_has_retry_after_and_validation_is_400() -> None:
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/busy")
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "queue_full"
        r = await client.post("/echo", json={"n": "x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = await client.post("/echo", content=b"{", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] is None
        r = await client.get("/x", headers={"X-Request-ID": "has space"})
        assert r.status_code == 404 and r.headers["x-request-id"].startswith("req-")


@pytest.mark.parametrize(
    ("exc", "status", "type_", "code"),
    [
        (InvalidRequest("m", param="p"), 400, "invalid_request_error", None),
        (UnsupportedParameter("m", param="n"), 400, "invalid_request_error", "unsupported_parameter"),
        (ContextLengthExceeded("m", param="prompt"), 400, "invalid_request_error", "context_length_exceeded"),
        (ModelNotFound("m", param="model"), 404, "invalid_request_error", "model_not_found"),
        (Overloaded("m"), 429, "rate_limit_error", "queue_full"),
        (NoPhoneAvailable("m"), 503, "service_unavailable_error", "no_phone_available"),
        (BackendError("m"), 502, "server_error", "phone_error"),
        (PhoneLost("m"), 502, "server_error", "phone_lost"),
        (PhoneStalled("m"), 502, "server_error", "phone_stalled"),
        (QhxError("m"), 500, "server_error", None),
    ],
)
def test_domain_errors_map_by_class(exc: QhxError, status: int, type_: str, code: str | None) -> None:
    got_status, body, _ = error_body(exc)
    assert got_status == status
    assert body == {"error": {"message": "m", "type": type_, "param": exc.param, "code": code}}
