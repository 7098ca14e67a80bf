"""Fuzzing the API from its own OpenAPI document (schemathesis), over the real stack.

Every documented operation gets schema-driven requests, valid and invalid (a bounded number here;
``benchmarks/fuzz.py`` runs many more): no 5xx, no hang (each call has a timeout), every error in
OpenAI's envelope, every response as the document says (status, media type, body schema), and every
event stream well formed. Bodies the schema cannot describe are in tests/api/test_bodies.py.

Half the generated bodies are repaired as a client that means it would write them (the served
model, none of the fields we refuse: :func:`repaired`), so that generation itself is reached (a
random model name is a 404 before any phone is asked); the other half go as generated. A negative
body that the repair made valid is judged as sent (``flatmap_case``).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis import Case, CheckContext, Response

from server.api.app import create_app
from server.settings import Settings
from server.sim.staging import FAMILY
from tests.api.live_server import LiveServer

# A shared, configurable budget: the suite's run; benchmarks/fuzz.py raises it.
EXAMPLES = 12
REQUEST_TIMEOUT_S = 30.0  # no hang: a response that takes longer fails the call
# endless by design (an SSE feed of the farm): covered by its own tests, not callable to its end
ENDLESS = ["/v1/devices/events"]
CONFIG: dict[str, Any] = {
    # schema-valid requests we rightly refuse (an unknown model, logprobs, n past the queue bound)
    "checks": {"positive_data_acceptance": {"enabled": False}},
    "request-timeout": REQUEST_TIMEOUT_S,
    # schemathesis reads 20 events of a stream by default; ours end (max_tokens <= the context, n
    # <= 128 choices): read them whole, to their [DONE] or error event
    "max-stream-events": 200_000,
}


# fields whose non-default values we refuse (400 unsupported_parameter): a third of the bodies go
# without them, so that most of those reach a phone
REFUSED = frozenset({"logit_bias", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "best_of",
                     "suffix", "stream_options", "functions", "function_call", "audio", "modalities",
                     "response_format"})


def repaired(body: dict[str, Any]) -> dict[str, Any]:
    """The body as a client that means it would send it: the served model, none of the fields we refuse,
    integers written as integers (JSON Schema's "integer" takes 2.0, our strict fields do not), one
    prompt, and a user turn last (the chat template needs one)."""
    out = {k: int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**53 else v
           for k, v in body.items() if k not in REFUSED}
    out["model"] = FAMILY
    if isinstance(out.get("prompt"), list) and out["prompt"] and isinstance(out["prompt"][0], (str, list)):
        out["prompt"] = out["prompt"][0]
    if isinstance(out.get("messages"), list):
        out["messages"] = [*out["messages"][:3], {"role": "user", "content": "Hello"}]
    return out


def envelope_errors(response_status: int, path: str, text: str) -> str | None:
    """Why an error response is not OpenAI's envelope (None: it is, or it is no error)."""
    if response_status < 400 or (path == "/ready" and response_status == 503):
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return f"{response_status} with a body that is not JSON: {text[:200]!r}"
    error = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"{response_status} not in the error envelope: {text[:200]!r}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return f"{response_status} with an empty message or type: {text[:200]!r}"
    return None


def stream_errors(text: str) -> str | None:
    """Why an SSE body is not OpenAI's stream: JSON ``data:`` events, ``: ping`` comments, and one end
    (``[DONE]``, or a last event in the error envelope)."""
    events = [block for block in text.split("\n\n") if block.strip()]
    data = [e for e in events if not e.startswith(":")]
    if not data:
        return "a stream without a single data event"
    for i, event in enumerate(data):
        if not event.startswith("data: "):
            return f"not a data event: {event[:100]!r}"
        payload = event[len("data: "):]
        if payload == "[DONE]":
            return None if i == len(data) - 1 else "events after [DONE]"
        chunk = json.loads(payload)
        if "error" in chunk:
            why = envelope_errors(500, "", payload)
            return why or (None if i == len(data) - 1 else "events after an error event")
    return "a stream that ends without [DONE] or an error event"


@schemathesis.check
def openai_error_envelope(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    why = envelope_errors(response.status_code, case.path, response.text)
    if why is not None:
        raise AssertionError(why)
    return True


@schemathesis.check
def well_formed_event_stream(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    why = stream_errors(response.text)
    if why is not None:
        raise AssertionError(why)
    return True


def load_schema(config: dict[str, Any] = CONFIG) -> Any:
    """The app's own document, built in-process (the live server serves the same one: checked below),
    endless operations left out, and half the bodies naming the served model."""
    document = create_app(Settings(sim=0)).openapi()
    loaded = schemathesis.openapi.from_dict(document, config=schemathesis.Config.from_dict(config))
    for path in ENDLESS:
        loaded = loaded.exclude(path=path)

    @loaded.hook
    def flatmap_case(context: Any, case: Case) -> Any:
        # on the case, not the body: schemathesis then judges the body sent, not the one generated. A
        # negative body whose only violation the repair removed is a valid one, and its 200 is right
        # (repairing in a body hook failed the run: "schema-violating request accepted")
        body = case.body
        if not (isinstance(body, dict) and "model" in body):
            return st.just(case)

        def sent_as(new: dict[str, Any]) -> Case:
            case.body = new
            return case

        return st.sampled_from([repaired(body), repaired(body), {**body, "model": FAMILY}, body]).map(sent_as)

    return loaded


schema = load_schema()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_every_operation_answers_as_its_schema_says(case: Case, live: LiveServer) -> None:
    case.call_and_validate(base_url=live.base_url, timeout=REQUEST_TIMEOUT_S,
                           additional_checks=[openai_error_envelope, well_formed_event_stream])


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def test_every_path_and_method_not_served_is_a_404_or_405_in_the_envelope(live: LiveServer) -> None:
    """Each documented path with every method it does not serve, and paths that do not exist."""
    spec = httpx.get(live.base_url + "/openapi.json", timeout=10).json()
    probes = [(m, p) for p, ops in spec["paths"].items() for m in METHODS if m.lower() not in ops
              and not (m == "HEAD" and "get" in ops)]
    probes += [(m, p) for m in METHODS for p in ("/v1/nothing", "/v1/completions/x", "/%ff", "/v1/models/")]
    with httpx.Client(base_url=live.base_url, timeout=10) as client:
        for method, path in probes:
            if "{" in path:
                path = path.split("{")[0] + "x"
            r = client.request(method, path, content=b"{}" if method in ("POST", "PUT", "PATCH") else None)
            assert r.status_code in (404, 405) or (method, path) == ("GET", "/v1/models/"), (method, path, r.status_code)
            if method != "HEAD":
                assert envelope_errors(r.status_code, path, r.text) is None, (method, path, r.text[:200])
            if r.status_code == 405:  # Allow names every method of the path, over all its routes
                documented = {m.upper() for p, ops in spec["paths"].items() for m in ops if p.split("{")[0] + "x" == path
                              or p == path}
                assert documented <= set(r.headers["allow"].replace(" ", "").split(",")), (path, r.headers["allow"])


def test_the_document_has_no_422_and_every_operation_documents_the_envelope(live: LiveServer) -> None:
    spec = httpx.get(live.base_url + "/openapi.json", timeout=10).json()
    assert spec == create_app(Settings(sim=0)).openapi()  # what the fuzz test was built from
    assert live.model == FAMILY
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            for code in ("4XX", "5XX"):
                ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
                assert ref == "#/components/schemas/ErrorResponse", (method, path, code)


@pytest.mark.parametrize(("status", "text", "wrong"), [
    (400, '{"error": {"message": "m", "type": "t", "param": null, "code": null}}', False),
    (404, '{"detail": "Not Found"}', True),
    (500, "Internal Server Error", True),
    (400, '{"error": {"message": "", "type": "t", "param": null, "code": null}}', True),
    (400, '{"error": {"message": "m", "type": "t"}}', True),
])
def test_the_envelope_check_tells_an_envelope_from_anything_else(status: int, text: str, wrong: bool) -> None:
    assert (envelope_errors(status, "/v1/completions", text) is not None) is wrong


@pytest.mark.parametrize(("text", "wrong"), [
    ('data: {"id": 1}\n\n: ping\n\ndata: [DONE]\n\n', False),
    ('data: {"id": 1}\n\ndata: {"error": {"message": "m", "type": "t", "param": null, "code": null}}\n\n', False),
    ('data: {"id": 1}\n\n', True),  # no end
    ("data: [DONE]\n\ndata: {}\n\n", True),  # events after the end
    ('data: {"error": {"message": "m"}}\n\n', True),  # an error outside the envelope
    ("event: x\n\ndata: [DONE]\n\n", True),
])
def test_the_stream_check_tells_a_stream_from_anything_else(text: str, wrong: bool) -> None:
    assert (stream_errors(text) is not None) is wrong
