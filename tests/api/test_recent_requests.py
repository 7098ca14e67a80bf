"""GET /v1/requests: the last requests with their outcome, on the real stack (openai client, sim phone),
and the ring itself (bounded, filters that agree with a plain scan)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.api.app import create_app
from server.api.auth import open_paths
from server.api.recent import ERROR_BODY_MAX, ERROR_MAX, OUTCOMES, RecentRequests, RequestRecord, error_in
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import LiveServer, ServerThread


def recent(live: LiveServer, **params: Any) -> list[dict[str, Any]]:
    r = httpx.get(live.base_url + "/v1/requests", params=params, timeout=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["size"] == live.settings.requests_log_size
    return list(body["data"])


def by_id(live: LiveServer, response_id: str) -> dict[str, Any]:
    return next(r for r in recent(live) if r["id"] == response_id)


def test_a_chat_completion_is_recorded_with_its_numbers(live: LiveServer) -> None:
    reply = live.client().chat.completions.create(model=live.model, messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=5)
    row = by_id(live, reply.id)
    assert reply.usage is not None
    assert row["endpoint"] == "/v1/chat/completions" and row["method"] == "POST"
    assert row["status"] == 200 and row["outcome"] == "ok" and row["error"] is None
    assert row["model"] == live.model and row["phone"] == live.phone.serial
    assert row["prompt_tokens"] == reply.usage.prompt_tokens
    assert row["completion_tokens"] == reply.usage.completion_tokens == 5
    assert row["finish_reason"] == "length"
    assert row["ttft_ms"] is not None and row["duration_ms"] >= row["ttft_ms"]
    assert row["request_id"].startswith("req-") and abs(row["created"] - time.time()) < 60


def test_an_error_is_recorded_with_its_status_and_message(live: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        live.client().completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    request_id = info.value.response.headers["x-request-id"]
    row = next(r for r in recent(live, status="error") if r["request_id"] == request_id)
    assert row["status"] == 404 and row["outcome"] == "error"
    assert row["error"] == info.value.body["message"] and row["error_code"] == info.value.body["code"]  # type: ignore[index]
    assert any(r["request_id"] == request_id for r in recent(live, status="404"))
    assert all(r["outcome"] == "error" for r in recent(live, status="error"))


def test_a_stream_mid_way_error_is_an_error_despite_its_200(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(crash_after=3)
    body = {"model": live.model, "prompt": "Go on", "max_tokens": 50, "stream": True}
    with httpx.stream("POST", live.base_url + "/v1/completions", json=body, timeout=30) as r:
        request_id = r.headers["x-request-id"]
        lines = list(r.iter_lines())
    assert any(line.startswith('data: {"error"') for line in lines)
    row = next(r for r in recent(live) if r["request_id"] == request_id)
    assert row["status"] == 200 and row["outcome"] == "error" and row["error"]


def test_running_then_cancelled_when_the_client_leaves(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(speed=1)
    body = {"model": live.model, "prompt": "Go on", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", live.base_url + "/v1/completions", json=body, timeout=30) as r:
        request_id = r.headers["x-request-id"]
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        next(lines)
        running = [row for row in recent(live, status="running") if row["request_id"] == request_id]
        assert running and running[0]["status"] is None and running[0]["endpoint"] == "/v1/completions"
    live.wait_idle(timeout=5)
    deadline = time.monotonic() + 5
    while (row := next(r for r in recent(live) if r["request_id"] == request_id))["outcome"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert row["outcome"] == "cancelled" and row["finish_reason"] == "abort" and row["error"] is None


def test_filters_by_phone_and_limit(live: LiveServer) -> None:
    live.client().completions.create(model=live.model, prompt="hi", max_tokens=1)
    mine = recent(live, phone=live.phone.serial)
    assert mine and all(r["phone"] == live.phone.serial for r in mine)
    assert recent(live, phone="no-such-phone") == []
    assert len(recent(live, limit=1)) == 1
    assert all(r["method"] == "POST" for r in recent(live))  # the GETs above are not requests to show


@pytest.mark.parametrize("params", [{"status": "bogus"}, {"status": "99"}, {"limit": 0}, {"limit": "x"}])
def test_bad_filters_are_400_naming_the_parameter(live: LiveServer, params: dict[str, Any]) -> None:
    r = httpx.get(live.base_url + "/v1/requests", params=params, timeout=5)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == next(iter(params))


def test_concurrent_requests_each_get_their_own_row(live: LiveServer) -> None:
    """Requests that overlap (some served, some refused: the queue holds one) never mix their fields."""
    statuses: dict[str, int] = {}

    def one(i: int) -> None:
        rid = f"req-concurrent-{i}"
        r = httpx.post(live.base_url + "/v1/completions", headers={"X-Request-ID": rid}, timeout=60,
                       json={"model": live.model, "prompt": "hi", "max_tokens": 2 + i})
        statuses[rid] = r.status_code

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    rows = {r["request_id"]: r for r in recent(live)}
    assert len(statuses) == 4 and 200 in statuses.values()
    for rid, status in statuses.items():
        row = rows[rid]
        assert row["status"] == status
        if status == 200:
            assert row["outcome"] == "ok" and row["completion_tokens"] == 2 + int(rid.rsplit("-", 1)[1])
        else:
            assert row["outcome"] == "error" and row["error"] and row["phone"] is None  # refused: no phone


# -- the ring ---------------------------------------------------------------------------------


def record(i: int, phone: str | None, outcome: str, status: int | None) -> RequestRecord:
    r = RequestRecord(f"req-{i}", float(i), "POST", "/v1/completions", phone=phone, status=status)
    r.outcome = outcome  # type: ignore[assignment]
    return r


rows = st.lists(st.tuples(st.sampled_from([None, "a", "b"]), st.sampled_from(OUTCOMES),
                          st.sampled_from([None, 200, 400, 503])), max_size=30)


@given(rows=rows, size=st.integers(0, 10), phone=st.sampled_from([None, "a", "b"]),
       status=st.sampled_from([None, *OUTCOMES, "200", "503"]), limit=st.sampled_from([None, 1, 3]))
def test_the_ring_keeps_the_newest_and_filters_like_a_scan(rows: list[tuple[Any, str, Any]], size: int,
                                                          phone: str | None, status: str | None,
                                                          limit: int | None) -> None:
    ring = RecentRequests(size)
    records = [record(i, *row) for i, row in enumerate(rows)]
    for r in records:
        ring.add(r)
    kept = records[-size:] if size else []
    want = [r.request_id for r in reversed(kept)
            if (phone is None or r.phone == phone)
            and (status is None or r.outcome == status or str(r.status) == status)][:limit]
    assert [r["request_id"] for r in ring.query(phone=phone, status=status, limit=limit)] == want


# -- who may write to the ring ------------------------------------------------------------------


def test_strangers_cannot_fill_the_ring_through_open_paths() -> None:
    """With keys set, the page, its files, the probes and the docs need none: a POST there (405) was
    recorded, so anyone who reached the port could push every real request out of a ring of 500 with
    500 POSTs to ``/``. Each open path, POSTed to without a key or with a wrong one, leaves no row; the
    keyed request after them is the only one there."""
    with SimLab(phones=0) as lab:
        settings = Settings(adb_servers=[lab.adb_server], sim=0, api_keys=["sk-ring"], requests_log_size=5)
        with ServerThread(create_app(settings)) as server:
            base = f"http://127.0.0.1:{server.port}"
            keyed = {"Authorization": "Bearer sk-ring"}
            paths = sorted(open_paths(settings))
            assert {"/", "/console", "/health", "/metrics"} <= set(paths)
            for path in paths:
                for headers in ({}, {"Authorization": "Bearer sk-wrong"}):
                    assert httpx.post(base + path, content=b"{}", headers=headers, timeout=5).status_code != 200
            r = httpx.post(base + "/tokenize", json={"prompt": "hi"}, headers=keyed, timeout=30)
            rows = httpx.get(base + "/v1/requests", headers=keyed, timeout=5).json()["data"]
    assert [(row["endpoint"], row["status"]) for row in rows] == [("/tokenize", r.status_code)]


def test_a_long_error_message_is_kept_in_part(live: LiveServer) -> None:
    """An error body longer than the ring reads (8 KiB: a 404 naming a 20,000-character model) was
    recorded as "HTTP 404": its JSON, cut, did not parse. The message's beginning is kept now."""
    name = "m" * 20_000
    r = httpx.post(live.base_url + "/v1/completions", json={"model": name, "prompt": "hi"}, timeout=30)
    assert r.status_code == 404 and len(r.content) > ERROR_BODY_MAX
    row = next(x for x in recent(live, status="404") if x["request_id"] == r.headers["x-request-id"])
    message = r.json()["error"]["message"]
    assert row["error"].endswith("…") and message.startswith(row["error"][:-1])
    assert 100 < len(row["error"]) <= ERROR_MAX


@given(message=st.text(max_size=300), code=st.sampled_from([None, "model_not_found"]), cut=st.integers(0, 2000))
def test_an_error_envelope_cut_anywhere_gives_a_beginning_of_its_message(message: str, code: str | None,
                                                                          cut: int) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}, ensure_ascii=cut % 2 == 0).encode()
    whole = error_in(body)
    assert whole is not None and whole["message"] == message and whole.get("code") == code
    part = error_in(body[:cut])
    if part is not None:
        got = part["message"]
        assert got == message or (got.endswith("…") and message.startswith(got[:-1]))
