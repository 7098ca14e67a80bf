"""Logs: X-Request-ID in and out, the request id on every line of the request, one access line per
request with model, phone, tokens and timings; JSON lines that parse."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.logs import configure_logging, make_handler, note_generation, note_request, request_context
from server.settings import Settings
from tests.api.live_server import LiveServer


class JsonLines:
    """The server's log records (the ``server`` loggers, debug and up) as parsed JSON lines."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def access(self, request_id: str, timeout: float = 2.0) -> dict[str, Any]:
        """The access line of ``request_id`` (written once the response is over: wait for it)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.lines() if r["logger"] == "server.api.access" and r["request_id"] == request_id]
            if found:
                assert len(found) == 1, found
                return found[0]
            assert time.monotonic() < deadline, f"no access line for {request_id}"
            time.sleep(0.02)


@contextlib.contextmanager
def captured_log(name: str, level: int) -> Iterator[JsonLines]:
    """Logger ``name``'s records (``level`` and up) as JSON lines, for the block."""
    logs = JsonLines()
    handler = make_handler("json", logs.stream)
    logger = logging.getLogger(name)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield logs
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def access_log() -> contextlib.AbstractContextManager[JsonLines]:
    """The access lines (``server.api.access``, info and up) as JSON, for the block."""
    return captured_log("server.api.access", logging.INFO)


@pytest.fixture
def json_logs() -> Iterator[JsonLines]:
    with captured_log("server", logging.DEBUG) as logs:
        yield logs


def test_request_id_is_echoed_or_made_up(live: LiveServer) -> None:
    raw = live.client().completions.with_raw_response.create(
        model=live.model, prompt="Hi", max_tokens=2, extra_headers={"X-Request-ID": "trace-echo-1"}
    )
    assert raw.headers["x-request-id"] == "trace-echo-1"
    made_up = httpx.get(live.base_url + "/v1/models").headers["x-request-id"]
    assert made_up.startswith("req-") and len(made_up) > 20
    assert httpx.get(live.base_url + "/nowhere", headers={"X-Request-ID": "bad id"}).headers["x-request-id"] != "bad id"


def test_one_json_access_line_with_model_phone_tokens_and_timings(live: LiveServer, json_logs: JsonLines) -> None:
    r = live.client().completions.create(
        model=live.model, prompt="Hello there", max_tokens=5, extra_headers={"X-Request-ID": "trace-json-1"},
        extra_body={"qhx_not_a_field": 1},  # makes the service log a line of its own for this request
    )
    line = json_logs.access("trace-json-1")
    assert r.usage is not None
    assert line["level"] == "INFO" and line["ts"].endswith("+00:00")
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/completions", 200)
    assert line["id"] == r.id and line["model"] == live.model and line["phone"] == live.devices()[0]["serial"]
    assert line["prompt_tokens"] == r.usage.prompt_tokens and line["completion_tokens"] == r.usage.completion_tokens
    assert line["finish_reason"] == "length"
    for key in ("queue_ms", "ttft_ms", "prefill_ms", "decode_ms"):
        assert isinstance(line[key], float) and line[key] >= 0, key
    assert line["queue_ms"] <= line["ttft_ms"] <= line["total_ms"]
    assert "POST /v1/completions 200" in line["msg"] and f"id={r.id}" in line["msg"]
    # every line about this request, whichever task wrote it, carries the client's id
    mine = [rec for rec in json_logs.lines() if r.id in rec["msg"]]
    assert {rec["logger"] for rec in mine} >= {"server.api.access", "server.serving.completions",
                                               "server.serving.driver"}
    assert {rec["request_id"] for rec in mine} == {"trace-json-1"}


def test_streamed_chat_gets_its_access_line_at_the_end(live: LiveServer, json_logs: JsonLines) -> None:
    stream = live.client().chat.completions.create(
        model=live.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Request-ID": "trace-json-2"},
    )
    usage = [c.usage for c in stream if c.usage is not None][-1]
    line = json_logs.access("trace-json-2")
    assert line["path"] == "/v1/chat/completions" and line["status"] == 200
    assert line["completion_tokens"] == usage.completion_tokens == 4 and line["id"].startswith("chatcmpl-")


def test_refused_request_has_its_line_too(live: LiveServer, json_logs: JsonLines) -> None:
    httpx.post(live.base_url + "/v1/completions", json={"model": "nope", "prompt": "x"},
               headers={"X-Request-ID": "trace-404"})
    line = json_logs.access("trace-404")
    assert line["status"] == 404 and "model" not in line  # refused before the engine: no generation fields


def test_probes_are_logged_at_debug(live: LiveServer, json_logs: JsonLines) -> None:
    httpx.get(live.base_url + "/health", headers={"X-Request-ID": "trace-probe"})
    assert json_logs.access("trace-probe")["level"] == "DEBUG"


def test_configure_logging_json_and_text() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        out = io.StringIO()
        configure_logging(Settings(log_format="json", log_level="info"), stream=out)
        configure_logging(Settings(log_format="json", log_level="info"), stream=out)  # replaces, not adds
        assert sum(getattr(h, "_qhx", False) for h in root.handlers) == 1
        with request_context("req-abc"):
            logging.getLogger("server.x").info("inside %s", "it")
        logging.getLogger("server.x").debug("not at info")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("server.x").exception("failed")
        # (other threads of the test process may log to the root handler meanwhile)
        inside, failed = (r for r in map(json.loads, out.getvalue().splitlines()) if r["logger"] == "server.x")
        assert inside["msg"] == "inside it" and inside["request_id"] == "req-abc"
        assert inside["level"] == "INFO" and inside["logger"] == "server.x" and "T" in inside["ts"]
        assert failed["request_id"] is None and "ValueError: boom" in failed["exc"]

        text = io.StringIO()
        configure_logging(Settings(log_format="text", log_level="info"), stream=text)
        with request_context("req-def"):
            logging.getLogger("server.x").info("hello")
        logging.getLogger("server.x").info("outside")
        first, second = (line for line in text.getvalue().splitlines() if " server.x " in line)
        assert first.endswith("INFO server.x [req-def] hello") and second.endswith("[-] outside")
    finally:
        for h in root.handlers[:]:
            if getattr(h, "_qhx", False):
                root.removeHandler(h)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_several_generations_sum_completions_and_keep_the_fewest_reused_and_request_fields_come_last() -> None:
    with request_context("req-n") as fields:
        note_request(dropped=4)
        note_generation(id="chatcmpl-1-0", prompt_tokens=30, reused=20, completion_tokens=5)
        note_generation(id="chatcmpl-1-1", prompt_tokens=30, reused=12, completion_tokens=7)
        note_generation(id="chatcmpl-1-2", prompt_tokens=30, reused=None, completion_tokens=0)  # never started
    assert fields == {"id": "chatcmpl-1-0", "prompt_tokens": 30, "reused": 12, "completion_tokens": 12,
                      "dropped": 4, "generations": 3}
    assert list(fields)[:4] == ["id", "prompt_tokens", "reused", "completion_tokens"]
    note_request(dropped=1)  # outside a request: nothing to note, no error
