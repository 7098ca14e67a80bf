"""/v1/completions through the official openai client, end to end on simulated phones."""

from __future__ import annotations

import itertools
import time
from typing import Any

import httpx
import openai
import pytest

from server.serving.tokens import HostTokenizer
from tests.api.live_server import LiveServer

PROMPT = "The phone said"


def text_of(live: LiveServer, **kw: Any) -> str:
    r = live.client().completions.create(model=live.model, prompt=kw.pop("prompt", PROMPT), temperature=0, **kw)
    return r.choices[0].text


def test_sync_completion_has_openai_shape_and_exact_usage(live: LiveServer, tokenizer: HostTokenizer) -> None:
    raw = live.client().completions.with_raw_response.create(model=live.model, prompt=PROMPT, max_tokens=20)
    r = raw.parse()
    assert raw.headers["x-request-id"].startswith("req-")
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == live.model
    assert len(r.choices) == 1 and r.choices[0].index == 0 and r.choices[0].logprobs is None
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20
    body = httpx.post(live.base_url + "/v1/completions", json={"model": live.model, "prompt": PROMPT}).json()
    assert list(body) == ["id", "choices", "created", "model", "object", "usage"]
    assert list(body["choices"][0]) == ["finish_reason", "index", "logprobs", "text"]
    assert body["usage"]["completion_tokens"] == 16  # the spec's default max_tokens


def test_client_request_id_is_honoured(live: LiveServer) -> None:
    r = httpx.get(live.base_url + "/health", headers={"X-Request-ID": "my-trace-42"})
    assert r.headers["x-request-id"] == "my-trace-42"


async def test_async_stream_with_include_usage(live: LiveServer, tokenizer: HostTokenizer) -> None:
    async with live.async_client() as client:
        stream = await client.completions.create(
            model=live.model, prompt=PROMPT, max_tokens=30, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
    *text_chunks, final, usage = chunks
    assert {c.id for c in chunks} == {chunks[0].id} and {c.created for c in chunks} == {chunks[0].created}
    assert all(c.object == "text_completion" and c.usage is None for c in [*text_chunks, final])
    assert all(c.choices[0].finish_reason is None for c in text_chunks)
    assert final.choices[0].finish_reason == "length" and final.choices[0].text == ""
    assert usage.choices == [] and usage.usage is not None
    assert usage.usage.completion_tokens == 30
    assert usage.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    streamed = "".join(c.choices[0].text for c in text_chunks)
    assert streamed == text_of(live, max_tokens=30)  # same text streamed or not (greedy)


def raw_events(live: LiveServer, body: dict[str, Any]) -> list[str]:
    """The SSE lines as sent (pings included)."""
    with httpx.stream("POST", live.base_url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


def test_stream_wire_format(live: LiveServer) -> None:
    lines = raw_events(live, {"model": live.model, "prompt": PROMPT, "max_tokens": 5, "stream": True})
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1] if line.startswith("data: ")]
    assert all("usage" not in c for c in chunks)  # no include_usage: no usage key at all
    lines = raw_events(live, {"model": live.model, "prompt": PROMPT, "max_tokens": 5, "stream": True,
                              "stream_options": {"include_usage": True}})
    chunks = [json.loads(line[6:]) for line in lines[:-1] if line.startswith("data: ")]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 5


def test_stream_sends_pings_while_waiting(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(slow_first_token_s=0.8)
    lines = raw_events(live, {"model": live.model, "prompt": PROMPT, "max_tokens": 3, "stream": True})
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    assert lines[:first_data] and all(line == ": ping" for line in lines[:first_data])


def test_stop_string_spanning_tokens_is_cut_exactly(live: LiveServer, tokenizer: HostTokenizer) -> None:
    full = text_of(live, max_tokens=60)
    ids = tokenizer.encode(full)
    pieces = [tokenizer.decode([i]) for i in ids]
    # a stop string made of the end of one token and the start of the next one
    stop = None
    pos = 0
    for left, right in itertools.pairwise(pieces):
        pos += len(left)
        candidate = left[-2:] + right[:2]
        if len(left) >= 2 and len(right) >= 2 and full.find(candidate) == pos - 2 and "\ufffd" not in candidate:
            stop = candidate
            break
    assert stop is not None, full
    want = full[: full.find(stop)]
    assert text_of(live, max_tokens=60, stop=stop) == want
    client = live.client()
    stream = client.completions.create(model=live.model, prompt=PROMPT, max_tokens=60, temperature=0,
                                       stop=["never-in-text", stop], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    live.wait_idle()  # the phone was cancelled at the match and is free


def test_multibyte_output_is_never_split(live: LiveServer) -> None:
    """The simulated model emits CJK and emoji, which span several byte-level tokens."""
    seen_multibyte = False
    for n in range(12):
        prompt = f"Tell me about {n}"
        full = text_of(live, prompt=prompt, max_tokens=120)
        stream = live.client().completions.create(model=live.model, prompt=prompt, max_tokens=120, temperature=0,
                                                  stream=True)
        pieces = [c.choices[0].text for c in stream]
        assert "".join(pieces) == full
        assert all("\ufffd" not in p for p in pieces)
        seen_multibyte |= any(ord(ch) > 0xFFFF for ch in full) and any("\u4e00" <= ch <= "\u9fff" for ch in full)
        if seen_multibyte:
            break
    assert seen_multibyte


def test_stop_id_ends_with_finish_reason_stop(live: LiveServer, phone_knobs: Any) -> None:
    phone_knobs(stop_rate=1.0, min_tokens=3)
    r = live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=100)
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and 3 <= r.usage.completion_tokens < 100


def test_echo_prepends_the_prompt(live: LiveServer) -> None:
    r = live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=5, echo=True, temperature=0)
    assert r.choices[0].text == PROMPT + text_of(live, max_tokens=5)
    chunks = list(live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=5, echo=True,
                                                   temperature=0, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_prompt_as_token_ids(live: LiveServer, tokenizer: HostTokenizer) -> None:
    ids = tokenizer.encode(PROMPT)
    r1 = live.client().completions.create(model=live.model, prompt=ids, max_tokens=8, temperature=0, echo=True)
    r2 = live.client().completions.create(model=live.model, prompt=[ids], max_tokens=8, temperature=0, echo=True)
    assert r1.choices[0].text == r2.choices[0].text == PROMPT + text_of(live, max_tokens=8)
    assert r1.usage is not None and r1.usage.prompt_tokens == len(ids)


def test_max_tokens_zero_and_null(live: LiveServer) -> None:
    r = live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=0, echo=True)
    assert r.choices[0].text == PROMPT and r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 0
    body = httpx.post(live.base_url + "/v1/completions",
                      json={"model": live.model, "prompt": PROMPT, "max_tokens": None}, timeout=30).json()
    assert body["usage"]["total_tokens"] == 1024  # everything that fits in the context


def test_model_name_is_matched_case_insensitively(live: LiveServer) -> None:
    r = live.client().completions.create(model=live.model.upper(), prompt=PROMPT, max_tokens=1)
    assert r.model == live.model


def test_unknown_model_is_404(live: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        live.client().completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):  # before the 200 of a stream too
        live.client().completions.create(model="gpt-4", prompt=PROMPT, stream=True)


def test_unknown_fields_are_accepted(live: LiveServer) -> None:
    r = live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=2, user="u1",
                                         extra_body={"some_vendor_flag": True, "min_p": 0.1})
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("field", "value"),
    [("best_of", 3), ("logprobs", 2), ("suffix", "tail"), ("presence_penalty", 0.5),
     ("frequency_penalty", -0.5), ("logit_bias", {"50256": -100})],
)
def test_parameters_we_cannot_honour_are_400_naming_them(live: LiveServer, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=2, **{field: value})
    assert e.value.status_code == 400 and e.value.param == field
    assert e.value.code == "unsupported_parameter"


def test_default_valued_unsupported_parameters_are_fine(live: LiveServer) -> None:
    r = live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=2, n=1, best_of=1, logprobs=0,
                                         presence_penalty=0, frequency_penalty=0, logit_bias={}, suffix="")
    assert r.choices[0].logprobs is None


def test_extension_sampling_parameters(live: LiveServer) -> None:
    r = live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=4, seed=7,
                                         extra_body={"top_k": 20, "repetition_penalty": 1.1})
    assert r.usage is not None and r.usage.completion_tokens == 4


def test_context_overflow_is_400_with_both_numbers(live: LiveServer, tokenizer: HostTokenizer) -> None:
    long_prompt = "word " * 1100
    n = len(tokenizer.encode(long_prompt))
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model=live.model, prompt=long_prompt, max_tokens=1)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    assert "1024" in e.value.message and str(n) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=1030)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    assert "1024" in e.value.message and "1030" in e.value.message


def test_one_megabyte_prompt_is_a_fast_clean_400(live: LiveServer) -> None:
    prompt = "lorem ipsum dolor sit amet " * 40_000  # ~1 MB
    t0 = time.monotonic()
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model=live.model, prompt=prompt, max_tokens=5)
    elapsed = time.monotonic() - t0
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    assert elapsed < 0.5, elapsed
    with pytest.raises(openai.BadRequestError):  # as a stream too: before the 200
        live.client().completions.create(model=live.model, prompt=prompt, max_tokens=5, stream=True)


def post_raw(live: LiveServer, content: bytes | str, content_type: str = "application/json") -> httpx.Response:
    return httpx.post(live.base_url + "/v1/completions", content=content, headers={"content-type": content_type},
                      timeout=10)


def assert_envelope(r: httpx.Response, status: int = 400, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"model": "x", "prompt": "a",}', b"\xff\xfe", b"[1, 2]",
                                     b"null", b'"just a string"'])
def test_malformed_json_is_400_in_the_envelope(live: LiveServer, content: bytes) -> None:
    assert_envelope(post_raw(live, content))


@pytest.mark.parametrize(
    ("patch", "param"),
    [({"max_tokens": "16"}, "max_tokens"), ({"max_tokens": 1.5}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"),
     ({"temperature": "hot"}, "temperature"), ({"temperature": 2.5}, "temperature"), ({"top_p": 1.5}, "top_p"),
     ({"stream": "yes"}, "stream"), ({"prompt": 12}, "prompt"), ({"prompt": [1, "a"]}, "prompt"),
     ({"prompt": {"text": "hi"}}, "prompt"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": 5}, "stop"),
     ({"model": None}, "model"), ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
     ({"seed": "x"}, "seed"), ({"echo": 1}, "echo"), ({"top_k": -5}, "top_k")],
)
def test_wrong_types_and_values_are_400_naming_the_param(live: LiveServer, patch: dict[str, Any], param: str) -> None:
    import json

    body = {"model": live.model, "prompt": PROMPT, "max_tokens": 2, **patch}
    assert_envelope(post_raw(live, json.dumps(body)), param=param)


def test_missing_model_and_stream_options_without_stream(live: LiveServer) -> None:
    import json

    err = assert_envelope(post_raw(live, json.dumps({"prompt": "x"})), param="model")
    assert err["code"] == "missing_required_parameter"
    assert_envelope(post_raw(live, json.dumps({"model": live.model, "prompt": "x",
                                                "stream_options": {"include_usage": True}})),
                    param="stream_options")


def test_batched_prompts_and_bad_token_ids(live: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model=live.model, prompt=["a", "b"], max_tokens=1)
    assert e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        live.client().completions.create(model=live.model, prompt=[1, 2, 10**9], max_tokens=1)
    assert e.value.param == "prompt"


def test_unknown_route_and_method_keep_their_status_in_the_envelope(live: LiveServer) -> None:
    r = httpx.post(live.base_url + "/v1/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(live.base_url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_return_timings_extension_gives_the_phone_timeline(live: LiveServer) -> None:
    r = live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=4,
                                         extra_body={"return_timings": True})
    t = (r.model_extra or {})["timings"]
    assert t["phone"] == live.phone.serial and t["decode_ms"] is not None
    assert t["phone_first_token_t_ms"] <= t["phone_last_token_t_ms"]
    chunks = list(live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=4, stream=True,
                                                   extra_body={"return_timings": True}))
    assert [bool((c.model_extra or {}).get("timings")) for c in chunks] == [False] * (len(chunks) - 1) + [True]
