"""Request bodies as clients send them, odd ones included: sizes, content codings, media types,
chunked uploads, odd Unicode, deep nesting, huge numbers and duplicate keys. Every answer is a
success or an OpenAI error envelope, never a 5xx (server/api/bodies.py, docs/reliability.md).

Raw HTTP (httpx) rather than the openai client: these are the bodies that client never sends.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import select
import socket
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api.app import create_app
from server.api.bodies import MAX_CODINGS
from server.settings import Settings
from tests.api.live_server import LiveServer, ServerThread

LIMIT = 8 * 1024 * 1024  # Settings.max_body_bytes default: the live server runs with it
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def post(live: LiveServer, path: str, content: bytes | Iterator[bytes], **headers: str) -> httpx.Response:
    return httpx.post(live.base_url + path, content=content, timeout=60,
                      headers={"content-type": "application/json", **headers})


def envelope(r: httpx.Response) -> dict[str, Any]:
    """The error of a failed response, checked to be OpenAI's envelope (and never a 5xx)."""
    assert r.status_code < 500, (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return dict(body["error"])


def completion(live: LiveServer, **extra: Any) -> dict[str, Any]:
    return {"model": live.model, "prompt": "Say hi", "max_tokens": 1, **extra}


def chat(live: LiveServer, **extra: Any) -> dict[str, Any]:
    return {"model": live.model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 1, **extra}


# --- size bound --------------------------------------------------------------------------------


def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    yield b'{"prompt": "'
    sent = 0
    while sent < total:
        yield b"x" * min(size, total - sent)
        sent += size
    yield b'"}'


@pytest.mark.parametrize("how", ["content-length", "chunked", "gzip"])
def test_a_body_over_the_limit_is_413_in_the_envelope(live: LiveServer, how: str) -> None:
    """Declared too long (refused unread), chunked without a length (refused once past the bound),
    or small but decompressing past it (a gzip bomb costs at most the bound)."""
    big = b" " * (LIMIT + 1)
    if how == "content-length":
        r = post(live, "/v1/completions", big)
    elif how == "chunked":
        r = post(live, "/v1/completions", _chunks(LIMIT + 1))
    else:
        r = post(live, "/v1/completions", gzip.compress(big), **{"content-encoding": "gzip"})
    assert r.status_code == 413, r.text[:300]
    err = envelope(r)
    assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
    assert "max_body_bytes" in err["message"] and str(LIMIT) in err["message"]
    assert r.headers["connection"] == "close"
    assert httpx.get(live.base_url + "/health", timeout=5).status_code == 200


def test_a_body_just_under_the_limit_is_read_and_judged_on_its_content(live: LiveServer) -> None:
    body = json.dumps(completion(live, user="u" * (LIMIT - 200))).encode()
    assert len(body) <= LIMIT
    r = post(live, "/v1/completions", body)
    assert r.status_code == 200, r.text[:300]


def test_a_chunked_upload_is_served_like_one_with_a_length(live: LiveServer) -> None:
    text = json.dumps(chat(live)).encode()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(text), 7):
            yield text[i : i + 7]

    r = post(live, "/v1/chat/completions", pieces())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 200, r.text[:300]
    assert r.json()["object"] == "chat.completion"


# --- bodies that do not come (slowloris) --------------------------------------------------------

BODY_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def impatient() -> Iterator[int]:
    """A server giving bodies BODY_TIMEOUT_S (no phone: a body is judged before any route)."""
    settings = Settings(sim=0, adb_servers=["127.0.0.1:9"], body_timeout_s=BODY_TIMEOUT_S)
    with ServerThread(create_app(settings)) as st:
        yield st.port


HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
# every way a body can stall: (headers and what is sent at once, what is trickled a byte at a time)
STALLS = {
    "declared, never sent": (HEAD + b"Content-Length: 40\r\n\r\n", b""),
    "declared, partly sent": (HEAD + b"Content-Length: 40\r\n\r\n{\"model\"", b""),
    "chunked, never ended": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n", b""),
    # a byte every quarter of the timeout: never idle for long, and never done (slowloris)
    "chunked, trickled": (HEAD + b"Transfer-Encoding: chunked\r\n\r\n", b"1\r\n \r\n" * 200),
    "declared, trickled": (HEAD + b"Content-Length: 4000\r\n\r\n", b" " * 4000),
}


@pytest.mark.parametrize("how", sorted(STALLS))
def test_a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closed(impatient: int, how: str) -> None:
    """uvicorn bounds neither: such a client held its request and connection as long as it liked
    (and a shutdown waited for it)."""
    first, trickle = STALLS[how]
    with socket.create_connection(("127.0.0.1", impatient), timeout=30) as sock:
        sock.sendall(first)
        for i in range(max(len(trickle), 1) * 8):  # bounded: 200 bytes of trickle take 50 timeouts
            if select.select([sock], [], [], BODY_TIMEOUT_S / 4)[0]:
                break
            if trickle and i < len(trickle):
                with contextlib.suppress(OSError):
                    sock.sendall(trickle[i : i + 1])
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # the answer, then the server closes the connection
            while chunk := sock.recv(65536):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), (how, answer[:300])
    assert b"connection: close" in head.lower()
    err = json.loads(body)["error"]
    assert err["code"] == "request_timeout" and "body_timeout_s" in err["message"]


# --- content codings ---------------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "identity", "gzip, gzip"])
def test_a_compressed_body_is_decoded(live: LiveServer, coding: str) -> None:
    raw = json.dumps(completion(live)).encode()
    data = raw
    for name in [c.strip() for c in coding.split(",")]:
        data = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress}.get(name, bytes)(data)
    r = post(live, "/v1/completions", data, **{"content-encoding": coding})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["object"] == "text_completion"


def test_a_gzip_body_of_several_members_is_decoded_whole(live: LiveServer) -> None:
    raw = json.dumps(completion(live)).encode()
    data = gzip.compress(raw[:10]) + gzip.compress(raw[10:])
    r = post(live, "/v1/completions", data, **{"content-encoding": "gzip"})
    assert r.status_code == 200, r.text[:300]


ENCODERS = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress, "identity": bytes}


def test_a_long_chain_of_codings_is_415_not_decoded(live: LiveServer) -> None:
    """Each decoding runs on the event loop (bounded by the size limit, but each one): 500 stored gzip
    layers of a 6 MB body held the loop 4 s. One more coding than the bound is refused."""
    data = json.dumps(completion(live)).encode()
    for _ in range(MAX_CODINGS + 1):
        data = gzip.compress(data)
    r = post(live, "/v1/completions", data, **{"content-encoding": ", ".join(["gzip"] * (MAX_CODINGS + 1))})
    assert r.status_code == 415, r.text[:300]
    err = envelope(r)
    assert err["code"] == "unsupported_media_type" and f"at most {MAX_CODINGS}" in err["message"]


@FUZZ
@given(codings=st.lists(st.tuples(st.sampled_from(sorted(ENCODERS)), st.booleans(), st.sampled_from(["", " "])),
                        max_size=MAX_CODINGS + 4))
def test_any_list_of_codings_is_decoded_within_the_bound_or_refused(
    live: LiveServer, codings: list[tuple[str, bool, str]],
) -> None:
    """Whatever the list (any case, spacing, identity anywhere): served when it names at most
    MAX_CODINGS real codings, a 415 otherwise; never a 5xx."""
    data = json.dumps(completion(live)).encode()
    for name, _upper, _space in codings:
        data = ENCODERS[name](data)
    header = ",".join(space + (name.upper() if upper else name) for name, upper, space in codings).strip()
    r = post(live, "/v1/completions", data, **({"content-encoding": header} if header else {}))
    if sum(name != "identity" for name, _u, _s in codings) <= MAX_CODINGS:
        assert r.status_code == 200, (header, r.text[:300])
    else:
        assert r.status_code == 415 and envelope(r)["code"] == "unsupported_media_type", (header, r.text[:300])


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br"])
def test_an_unknown_content_encoding_is_415(live: LiveServer, coding: str) -> None:
    r = post(live, "/v1/completions", b"\x00\x01", **{"content-encoding": coding})
    assert r.status_code == 415, r.text[:300]
    err = envelope(r)
    assert err["code"] == "unsupported_media_type" and "Content-Encoding" in err["message"]


@pytest.mark.parametrize("data", [b"not gzip at all", gzip.compress(b'{"model": "m"}')[:-9]], ids=["garbage", "truncated"])
def test_a_body_that_does_not_decode_is_400(live: LiveServer, data: bytes) -> None:
    r = post(live, "/v1/completions", data, **{"content-encoding": "gzip"})
    assert r.status_code == 400, r.text[:300]
    assert envelope(r)["code"] == "invalid_body"


# --- media types -------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml",
    "application/octet-stream",
])
def test_a_body_that_is_not_declared_json_is_415_naming_the_type(live: LiveServer, content_type: str) -> None:
    r = post(live, "/v1/chat/completions", json.dumps(chat(live)).encode(), **{"content-type": content_type})
    assert r.status_code == 415, r.text[:300]
    err = envelope(r)
    assert err["code"] == "unsupported_media_type" and content_type.split(";")[0] in err["message"]


@pytest.mark.parametrize("content_type", [None, "application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_under_any_json_media_type_or_none_is_served(live: LiveServer, content_type: str | None) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    r = httpx.post(live.base_url + "/v1/chat/completions", content=json.dumps(chat(live)).encode(), headers=headers,
                   timeout=60)
    assert r.status_code == 200, r.text[:300]


# --- JSON oddities -----------------------------------------------------------------------------


def test_duplicate_keys_the_last_one_wins(live: LiveServer) -> None:
    """As in Python, JavaScript and most JSON parsers: documented, not refused."""
    model = json.dumps(live.model)
    text = f'{{"model": {model}, "prompt": "Hi", "max_tokens": 900, "max_tokens": 2, "n": 5, "n": 1}}'
    r = post(live, "/v1/completions", text.encode())
    assert r.status_code == 200, r.text[:300]
    assert r.json()["usage"]["completion_tokens"] == 2 and len(r.json()["choices"]) == 1


ODD = ["\x00", "\u0301", "\u0338", "\u202e", "\u200f", "\u0627\u0644", "\u05d0", "\ufeff", "\uffff", "\ufffd",
       "\U0001f600", "\U0001f468\u200d\U0001f469", "\U00010348", "\U0010ffff", "\x7f", "\u2028", "a", " ", "\n"]
# surrogates left out: a lone one is the `lone` case (st.characters() draws one now and then, and the
# test then expected a 200 for a body it had made invalid)
odd_text = st.lists(st.one_of(st.sampled_from(ODD), st.characters(exclude_categories=["Cs"])),
                    max_size=30).map("".join)
surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)

# where a string goes: (path, body builder, the param a lone surrogate there is reported as)
PLACES: list[tuple[str, str, Any, str | None]] = [
    ("/v1/completions", "prompt", lambda m, s: {"model": m, "prompt": s, "max_tokens": 1}, "prompt"),
    ("/v1/completions", "prompt list", lambda m, s: {"model": m, "prompt": [s], "max_tokens": 1}, "prompt[0]"),
    ("/v1/completions", "stop", lambda m, s: {"model": m, "prompt": "x", "max_tokens": 1, "stop": [s]}, "stop[0]"),
    ("/v1/completions", "user", lambda m, s: {"model": m, "prompt": "x", "max_tokens": 1, "user": s}, "user"),
    ("/v1/chat/completions", "content",
     lambda m, s: {"model": m, "messages": [{"role": "user", "content": s}], "max_tokens": 1}, "messages[0].content"),
    ("/v1/chat/completions", "content part",
     lambda m, s: {"model": m, "messages": [{"role": "user", "content": [{"type": "text", "text": s}]}],
                   "max_tokens": 1}, "messages[0].content[0].text"),
    ("/v1/chat/completions", "system",
     lambda m, s: {"model": m, "messages": [{"role": "system", "content": s}, {"role": "user", "content": "hi"}],
                   "max_tokens": 1}, "messages[0].content"),
    ("/v1/chat/completions", "tool description",
     lambda m, s: {"model": m, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                   "tools": [{"type": "function", "function": {"name": "f", "description": s}}]},
     "tools[0].function.description"),
    ("/v1/chat/completions", "unknown field", lambda m, s: {"model": m, "messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 1, "x_note": s}, "x_note"),
    ("/tokenize", "tokenize prompt", lambda m, s: {"model": m, "prompt": s}, "prompt"),
]


@FUZZ
@given(place=st.sampled_from(PLACES), text=odd_text, lone=st.one_of(st.none(), surrogate),
       at=st.integers(0, 40), escaped=st.booleans())
def test_odd_unicode_anywhere_is_served_or_a_400_never_a_5xx(
    live: LiveServer, place: tuple[str, str, Any, str | None], text: str, lone: str | None, at: int, escaped: bool,
) -> None:
    """NUL, combining marks, RTL marks, 4-byte characters, noncharacters and BOMs are text like any
    other; a lone surrogate (only expressible as a JSON escape) is a 400 naming the field; the same
    surrogate sent as raw (invalid UTF-8) bytes is a 400 too."""
    path, _name, build, param = place
    if lone is not None:
        text = text[:at] + lone + text[at:]
    body = build(live.model, text)
    data = json.dumps(body, ensure_ascii=escaped).encode("utf-8", "surrogatepass")
    r = post(live, path, data)
    if lone is None:
        assert r.status_code == 200, r.text[:300]
        return
    assert r.status_code == 400, r.text[:300]
    err = envelope(r)
    if escaped:  # parsed, then refused naming the field
        assert err["param"] == param and "surrogate" in err["message"], err


# where a nested value goes, and what it may get (200: accepted as an unknown or free-form field)
NESTS: list[tuple[str, Any]] = [
    ("/v1/completions", lambda m, v: v),
    ("/v1/completions", lambda m, v: {"model": m, "prompt": "x", "max_tokens": 1, "x_extra": v}),
    ("/v1/completions", lambda m, v: {"model": m, "prompt": v, "max_tokens": 1}),
    ("/v1/chat/completions", lambda m, v: {"model": m, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 1, "chat_template_kwargs": {"x": v}}),
    ("/v1/chat/completions", lambda m, v: {"model": m, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 1, "tools": [{"type": "function", "function": {
                                               "name": "f", "parameters": {"type": "object", "x": v}}}]}),
    ("/v1/chat/completions", lambda m, v: {"model": m, "messages": [{"role": "user", "content": v}], "max_tokens": 1}),
    ("/v1/chat/completions", lambda m, v: {"model": m, "messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function", "function": {
            "name": "f", "arguments": ARGUMENTS}}]}, {"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("/tokenize", lambda m, v: {"model": m, "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": v}),
]


ARGUMENTS = "__ARGUMENTS__"  # the tool call's arguments: the nested JSON as a string


def nested(depth: int, kind: str) -> str:
    """JSON text nested ``depth`` deep (built as text: Python's json cannot write it past ~1000)."""
    if kind == "list":
        return "[" * depth + "1" + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


@FUZZ
@given(place=st.sampled_from(NESTS), depth=st.one_of(st.integers(1, 60), st.integers(60, 3000), st.just(100_000)),
       kind=st.sampled_from(["list", "object"]))
def test_deep_nesting_anywhere_is_a_4xx_or_served_never_a_5xx(
    live: LiveServer, place: tuple[str, Any], depth: int, kind: str
) -> None:
    """Deeper than Python's JSON parser goes (~1,000): a 400 ("error parsing the body"); within it,
    what the field allows (a 200 for free-form fields, a 400 naming the field for typed ones)."""
    path, build = place
    marker = "__NESTED__"
    deep = nested(depth, kind)
    text = json.dumps(build(live.model, marker)).replace(json.dumps(marker), deep)
    text = text.replace(json.dumps(ARGUMENTS), json.dumps(deep))
    r = post(live, path, text.encode())
    if r.status_code != 200:
        envelope(r)
        assert r.status_code in (400, 413), r.text[:300]


NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(0, 5000).map(lambda n: "9" * max(n, 1)),  # as JSON text: past Python's 4,300-digit int limit
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["1e309", "-1e309", "NaN", "Infinity", "-Infinity", "-0", "1e-400", "0.0", "1.0e2",
                     "18446744073709551616", "-9223372036854775809"]),
)
NUMERIC_FIELDS = [("/v1/completions", f) for f in ("max_tokens", "n", "seed", "temperature", "top_p", "top_k",
                                                  "repetition_penalty", "logprobs", "best_of", "prompt_id")] + [
    ("/v1/chat/completions", f) for f in ("max_completion_tokens", "max_tokens", "n", "seed", "temperature",
                                          "top_logprobs", "presence_penalty", "frequency_penalty")]


@FUZZ
@given(field=st.sampled_from(NUMERIC_FIELDS), number=NUMBERS)
def test_huge_and_odd_numbers_are_a_400_or_served_never_a_5xx(live: LiveServer, field: tuple[str, str],
                                                              number: float | str) -> None:
    """Integers past int64 and past Python's digit limit, floats past double (1e309), NaN, Infinity,
    -0: each is a 400 naming the field, or a value the field accepts (served)."""
    path, name = field
    text_number = number if isinstance(number, str) else json.dumps(number)
    base = chat(live) if path.endswith("chat/completions") else completion(live)
    if name == "prompt_id":
        base["prompt"] = "__N__"
    else:
        base[name] = "__N__"
    text = json.dumps(base).replace('"__N__"', f"[{text_number}]" if name == "prompt_id" else text_number)
    r = post(live, path, text.encode())
    if r.status_code != 200:
        err = envelope(r)
        # a valid n beyond what the queue holds is its 429, not a 400
        assert r.status_code == 400 or (name == "n" and (r.status_code, err["code"]) == (429, "queue_full")), r.text[:300]
