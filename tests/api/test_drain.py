"""server/api/shutdown.py: what a request meets while the server drains (the signals and the whole
process: tests/test_shutdown.py)."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

from server.api.routes import health
from server.api.shutdown import Drain, DrainMiddleware


class NoPhones:
    def health(self) -> list[object]:
        return []


def app_with(drain: Drain) -> FastAPI:
    app = FastAPI()
    app.state.drain = drain
    app.state.backend = NoPhones()
    app.include_router(health.router)

    @app.post("/v1/completions")
    async def work() -> dict[str, int]:
        await asyncio.sleep(0.05)
        return {"in_flight": drain.in_flight}

    app.add_middleware(DrainMiddleware, drain=drain)
    return app


async def test_while_draining_a_new_request_is_a_503_in_the_envelope_and_the_probes_answer() -> None:
    drain = Drain(grace_s=60)
    transport = httpx.ASGITransport(app=app_with(drain))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        ok = await client.post("/v1/completions")
        assert ok.status_code == 200 and ok.json() == {"in_flight": 1}  # counted while it runs
        assert drain.in_flight == 0
        drain.begin()
        refused = await client.post("/v1/completions")
        assert refused.status_code == 503 and refused.headers["connection"] == "close"
        assert refused.json()["error"]["code"] == "server_shutting_down"
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert (await client.get("/health")).status_code == 200
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        drain.expire()
        assert drain.expired.is_set()


async def test_the_grace_period_ends_on_its_own_and_calls_what_registered() -> None:
    drain = Drain(grace_s=0.05)
    called: list[str] = []
    with drain.on_expire(lambda: called.append("stream")):
        drain.begin()
        await asyncio.wait_for(drain.expired.wait(), 10)
    assert called == ["stream"]
    with drain.on_expire(lambda: called.append("late")):  # registered after the end: called at once
        pass
    assert called == ["stream", "late"]
