"""The soak's own checks can fail: its load (benchmarks/soak.py) against a server that answers some
requests with a 500, an unknown error code, a stream cut without [DONE], the wrong number of choices,
or never. Each of those must be reported (unexplained or hung), and only those: a soak that passed
whatever the server did would prove nothing."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from benchmarks.soak import Config, Report, load, make_request
from tests.api.live_server import ServerThread

REQUESTS = 30
SEED = 7
# what the server does with request #i, by i % 6
BEHAVIOURS = ("ok", "500", "hang", "broken", "unknown_code", "queue_full")


def envelope(status: int, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": code, "type": "x", "param": None, "code": code}}, status_code=status)


async def answer(request: Request) -> Response:
    body = await request.json()
    text = json.dumps(body.get("messages") or body.get("prompt"))
    behaviour = BEHAVIOURS[int(re.search(r"Request (\d+)", text).group(1)) % len(BEHAVIOURS)]  # type: ignore[union-attr]
    n = body["n"]
    if behaviour == "hang":
        await asyncio.sleep(3600)
    if behaviour == "500":
        return envelope(500, "internal_error")
    if behaviour == "queue_full":
        return envelope(429, "queue_full")
    if not body["stream"]:
        if behaviour == "broken":
            return PlainTextResponse("Internal Server Error", status_code=500)
        choices = n + 1 if behaviour == "unknown_code" else n  # (a 200 that is not what was asked)
        return JSONResponse({"choices": [{"index": i, "text": "x"} for i in range(choices)]})

    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'
        if behaviour == "unknown_code":
            yield b'data: {"error": {"message": "m", "type": "t", "param": null, "code": "internal_error"}}\n\n'
        elif behaviour == "ok":
            yield b"data: [DONE]\n\n"
        # broken: the stream ends without [DONE] or an error event

    return StreamingResponse(events(), media_type="text/event-stream")


APP = Starlette(routes=[Route("/v1/completions", answer, methods=["POST"]),
                        Route("/v1/chat/completions", answer, methods=["POST"])])


def test_the_soak_reports_every_500_hang_and_broken_answer_and_nothing_else() -> None:
    cfg = Config(clients=8, deadline_slack_s=2.0,
                 server_env={"QHX_QUEUE_TIMEOUT_S": "0.5", "QHX_STALL_TIMEOUT_S": "0.5"})
    report = Report()
    with ServerThread(APP) as server:
        asyncio.run(load(cfg, f"http://127.0.0.1:{server.port}", report, REQUESTS, SEED,
                         stop_at=float("inf")))
    rng = random.Random(SEED)  # the requests load() made, in order
    expected: dict[str, set[int]] = {"unexplained": set(), "hung": set(), "completed": set(), "error": set()}
    leaving = set()  # clients that leave early: "left", or what they saw before leaving
    for i in range(REQUESTS):
        _, _, leave_chunks, leave_s = make_request(rng, i)
        if leave_chunks is not None or leave_s is not None:
            leaving.add(i)
            continue
        behaviour = BEHAVIOURS[i % len(BEHAVIOURS)]
        expected[{"ok": "completed", "hang": "hung", "queue_full": "error"}.get(behaviour, "unexplained")].add(i)
    seen = {kind: {int(re.match(r"#(\d+) ", line).group(1)) for line in lines} - leaving  # type: ignore[union-attr]
            for kind, lines in (("unexplained", report.unexplained), ("hung", report.hung))}
    assert seen["unexplained"] == expected["unexplained"], report.unexplained
    assert seen["hung"] == expected["hung"], report.hung
    assert report.requests == REQUESTS and report.kinds["completed"] >= len(expected["completed"])
    assert report.errors["429 queue_full"] >= len(expected["error"])
    assert len(expected["unexplained"]) >= 4 and expected["hung"]  # the seed exercises every kind
    assert not report.ok
