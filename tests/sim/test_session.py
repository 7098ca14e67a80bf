"""Session protocol v1 (device-protocol.md section 3) as spoken by the simulated runtime.

One session process is shared by the tests of this module while it stays healthy (a process costs
~2 s of tokenizer loading); knobs are changed live through sim.json, as the runtime re-reads it.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from server.sim.simconfig import write_sim_config
from server.sim.staging import stage_phone
from server.sim.vocab import THINK_END_ID, TOOL_CALL_ID, load_tokenizer, token_bytes
from tests.sim.runtime_proc import ENDOFTEXT, IM_END, RuntimeSession, toks

BASE = {"speed": 0, "load_s": 0}
CAP = 300  # max_new on the session command line
STOPS = [IM_END, ENDOFTEXT]

Knobs = Callable[..., None]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sandbox = tmp_path_factory.mktemp("phone")
    stage_phone(sandbox, precision="both", sim_config=BASE)
    return sandbox


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture
def knobs(sandbox: Path) -> Iterator[Knobs]:
    """Set sim.json knobs for one test; the base knobs come back afterwards."""
    yield lambda **k: write_sim_config(sandbox, k) and None
    write_sim_config(sandbox, BASE, merge=False)


class _Shared:
    current: RuntimeSession | None = None
    ready: dict[str, Any] | None = None


@pytest.fixture(scope="module")
def shared(sandbox: Path) -> Iterator[_Shared]:
    holder = _Shared()
    yield holder
    if holder.current is not None:
        holder.current.kill()


@pytest.fixture
def session(shared: _Shared, sandbox: Path, knobs: Knobs) -> RuntimeSession:
    """The shared session if it is alive and idle, else a fresh one (its `ready` in shared.ready)."""
    s = shared.current
    if s is not None:
        try:
            s.send(op="ping", id="health")
            healthy = s.recv(timeout=5) == {"ev": "pong", "id": "health"} and s.quiet(0.05)
        except (OSError, queue.Empty, AssertionError, ValueError):  # dead, stuck or off-protocol
            healthy = False
        if healthy:
            return s
        s.kill()
    s = RuntimeSession(sandbox, max_new=CAP)
    shared.current, shared.ready = s, s.recv(timeout=60)
    return s


def chat(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def test_ready_is_first_and_describes_the_bundle(session: RuntimeSession, shared: _Shared) -> None:
    assert shared.ready == {
        "ev": "ready", "proto": 1, "model": "qwen3.5-0.8b", "precision": "fp16", "max_context": 1024,
        "vocab_size": 248320, "load_ms": shared.ready["load_ms"], "soc": "SM8850", "arch": "v81",
        "checkpoints": 4,  # v1.1, the knob's default
    }
    assert isinstance(shared.ready["load_ms"], float)


def test_generate_sends_start_toks_done(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(stop_rate=0)
    events = session.generate("g1", [9419, 11, 1814], 12, temperature=0, stop_ids=STOPS)
    assert events[0] == {"ev": "start", "id": "g1", "prompt_tokens": 3, "state_tokens": 0, "restored": None}
    body, done = events[1:-1], events[-1]
    assert [e["ev"] for e in body] == ["tok"] * 12
    assert all(len(e["ids"]) == 1 and isinstance(e["t_ms"], float) for e in body)
    t_ms = [e["t_ms"] for e in body]
    assert t_ms == sorted(t_ms)
    assert done["ev"] == "done" and done["reason"] == "length" and done["saved"] == []
    assert (done["prompt_tokens"], done["completion_tokens"]) == (3, 12)
    assert done["prefill_ms"] >= 0 and done["decode_ms"] >= 0


def test_generate_while_busy_is_refused_and_cancel_stops_within_a_token(session: RuntimeSession,
                                                                         knobs: Knobs) -> None:
    knobs(speed=1, decode_tps=5, stop_rate=0)  # 200 ms per token
    step_ms = 200
    session.send(op="generate", id="long", prompt_ids=[1, 2], max_new=100)
    assert session.recv()["ev"] == "start"
    assert session.recv()["ev"] == "tok"
    session.send(op="generate", id="other", prompt_ids=[1], max_new=1)
    assert session.recv() == {"ev": "error", "id": "other", "code": "busy",
                              "message": "request long is still generating"}
    sent = session.send(op="cancel", id="long")
    while True:
        arrived, event = session.recv_timed()
        if event["ev"] == "done":
            break
        assert event["ev"] == "tok"
    assert event["reason"] == "cancelled" and event["id"] == "long"
    assert (arrived - sent) * 1000 < step_ms
    # idle again right away
    assert session.generate("after", [1], 1)[-1]["ev"] == "done"


def test_cancel_latency_at_the_real_rate(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(speed=1, stop_rate=0)  # 22.7 tok/s: 44 ms per token
    session.send(op="generate", id="c", prompt_ids=[1], max_new=200)
    assert session.until("tok", "c")[0]["ev"] == "start"
    sent = session.send(op="cancel", id="c")
    events = session.until("done", "c")
    arrived_done = time.monotonic()
    assert events[-1]["reason"] == "cancelled"
    assert len(events) <= 2  # at most the token already in flight
    assert (arrived_done - sent) < 1 / 22.7 + 0.05  # one token time, plus scheduling slack


def test_cancel_of_an_unknown_request_is_ignored(session: RuntimeSession) -> None:
    session.send(op="cancel", id="nobody")
    assert session.quiet(0.2)


def test_ping_is_answered_while_generating(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(speed=1, decode_tps=20, stop_rate=0)
    session.send(op="generate", id="p", prompt_ids=[1], max_new=8)
    assert session.recv()["ev"] == "start"
    assert session.recv()["ev"] == "tok"
    session.send(op="ping", id="ping-1")
    events = session.until("done", "p")
    pong = events.index({"ev": "pong", "id": "ping-1"})
    assert pong < len(events) - 2  # tokens still came after the pong


def test_reset_false_continues_and_pays_prefill_only_for_new_tokens(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(speed=1, decode_tps=100, prefill_factor=1.0, stop_rate=0)  # 10 ms per prompt token
    first = session.generate("t1", list(range(100, 160)), 4)
    second = session.generate("t2", [7, 8, 9], 4, reset=False)
    assert second[0]["state_tokens"] == 60 + 4
    d1, d2 = first[-1], second[-1]
    assert 600 <= d1["prefill_ms"] < 600 + 250
    assert 30 <= d2["prefill_ms"] < 30 + 150
    assert d2["prompt_tokens"] == 3
    third = session.generate("t3", [7], 2, reset=True)
    assert third[0]["state_tokens"] == 0


def test_decode_rate_follows_the_deadlines(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(speed=1, stop_rate=0)
    done = session.generate("rate", [1], 23)[-1]
    expected_ms = 23 / 22.7 * 1000
    assert expected_ms * 0.97 <= done["decode_ms"] <= expected_ms * 1.10


def test_prompt_that_does_not_fit_is_a_context_overflow(session: RuntimeSession) -> None:
    events = session.generate("big", [1] * 1025, 4)
    assert events == [{"ev": "error", "id": "big", "code": "context_overflow", "message": events[0]["message"]}]


def test_context_fills_up_with_length_and_state_counts_towards_it(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(stop_rate=0)
    events = session.generate("edge", [1] * 1020, 10, stop_ids=STOPS)
    assert len(toks(events)) == 4 and events[-1]["reason"] == "length"
    over = session.generate("more", [1], 1, reset=False)
    assert over[0]["code"] == "context_overflow"
    # an error leaves the state undefined (v1.1): the host starts again from a reset
    session.generate("base", [1] * 1000, 4)
    assert session.generate("cont", [1] * 10, 2, reset=False)[0]["state_tokens"] == 1004


def test_max_new_gives_length_and_is_capped_by_the_command_line(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(stop_rate=0)
    events = session.generate("five", [1], 5, stop_ids=STOPS)
    assert len(toks(events)) == 5 and events[-1]["reason"] == "length"
    assert events[-1]["completion_tokens"] == 5
    assert len(toks(session.generate("capped", [1], 900))) == CAP


def test_stop_id_ends_the_request_and_is_not_sent(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(stop_rate=1.0, min_tokens=0)
    events = session.generate("s", [1, 2, 3], 200, stop_ids=STOPS)
    assert events[-1]["reason"] == "stop"
    ids = toks(events)
    assert 0 < len(ids) < 200 and not set(ids) & set(STOPS)
    assert events[-1]["completion_tokens"] == len(ids)


def test_without_stop_ids_generation_runs_to_max_new(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(stop_rate=1.0, min_tokens=0)
    events = session.generate("nostop", [1, 2, 3], 60, stop_ids=[])
    assert events[-1]["reason"] == "length" and len(toks(events)) == 60


def test_without_stop_ids_the_end_of_turn_is_an_ordinary_token_and_the_text_goes_on(
    session: RuntimeSession, knobs: Knobs
) -> None:
    """As a model's: nothing stops it, so ``<|im_end|>`` is sampled like any token and more follows
    (what lets the host apply ignore_eos and min_tokens, server/serving/driver.py)."""
    knobs(stop_rate=1.0, min_tokens=0)
    ids = toks(session.generate("eos", [1, 2, 3], 120, stop_ids=[]))
    assert len(ids) == 120 and IM_END in ids
    assert ids.index(IM_END) < 100 and ids[ids.index(IM_END) + 1 :] != []
    assert ENDOFTEXT not in ids


@pytest.mark.parametrize("line", [
    b"not json\n",
    b"[1, 2]\n",
    b'{"op": "generate", "id": 5, "prompt_ids": [1], "max_new": 1}\n',
    b'{"op": "warp", "id": "x"}\n',
    b'{"op": "generate", "id": "x", "max_new": 1}\n',
    b'{"op": "generate", "id": "x", "prompt_ids": [1, "a"], "max_new": 1}\n',
    b'{"op": "generate", "id": "x", "prompt_ids": [999999], "max_new": 1}\n',
    b'{"op": "generate", "id": "x", "prompt_ids": [1], "max_new": -1}\n',
    b'{"op": "generate", "id": "x", "prompt_ids": [1], "max_new": 1, "stop_ids": 3}\n',
    b'{"op": "generate", "id": "x", "prompt_ids": [1], "max_new": 1, "reset": "no"}\n',
    b'{"op": "generate", "id": "x", "prompt_ids": [1], "max_new": 1, "temperature": "hot"}\n',
    b'{"op": "generate", "id": "x", "prompt_ids": [1], "max_new": 1, "seed": 1.5}\n',
    b'{"op": "cancel"}\n',
])
def test_bad_requests_get_bad_request_and_the_session_lives_on(session: RuntimeSession, line: bytes) -> None:
    session.send_raw(line)
    error = session.recv()
    assert error["ev"] == "error" and error["code"] == "bad_request" and error["message"]
    known = json.loads(line).get("id") if line.startswith(b"{") else None
    assert error["id"] == (known if isinstance(known, str) else None)
    session.send(op="ping", id="alive")
    assert session.recv() == {"ev": "pong", "id": "alive"}


def test_unknown_fields_are_ignored(session: RuntimeSession) -> None:
    session.send(op="ping", id="u", future_field={"x": 1})
    assert session.recv() == {"ev": "pong", "id": "u"}
    events = session.generate("u2", [1], 2, priority="high", logprobs=5)
    assert events[-1]["ev"] == "done"


def test_greedy_is_deterministic_per_context(session: RuntimeSession) -> None:
    a = toks(session.generate("d1", [1, 2, 3], 40, temperature=0))
    b = toks(session.generate("d2", [1, 2, 3], 40, temperature=0))
    c = toks(session.generate("d3", [1, 2, 4], 40, temperature=0))
    assert a == b and a != c


def test_seed_makes_sampling_reproducible(session: RuntimeSession) -> None:
    a = toks(session.generate("s1", [5, 6], 40, temperature=0.8, seed=7))
    b = toks(session.generate("s2", [5, 6], 40, temperature=0.8, seed=7))
    c = toks(session.generate("s3", [5, 6], 40, temperature=0.8, seed=8))
    d = toks(session.generate("s4", [5, 6], 40, temperature=0.8))
    e = toks(session.generate("s5", [5, 6], 40, temperature=0.8))
    assert a == b and a != c and d != e


def test_text_has_multibyte_chars_and_split_utf8_tokens(session: RuntimeSession, tokenizer: Tokenizer,
                                                         knobs: Knobs) -> None:
    knobs(stop_rate=0)
    ids = toks(session.generate("mb", [11, 12], CAP, temperature=0))
    text = tokenizer.decode(ids)
    assert any(ord(ch) > 0x7F for ch in text)
    pieces = [token_bytes(tokenizer, i) for i in ids]
    assert b"".join(pieces).decode("utf-8") == text
    partial = []
    for piece in pieces:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            partial.append(piece)
    assert partial


def test_thinking_prompt_gets_reasoning_then_the_answer(session: RuntimeSession, tokenizer: Tokenizer,
                                                         knobs: Knobs) -> None:
    prompt = chat(tokenizer, "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    ids = toks(session.generate("th", prompt, CAP, stop_ids=STOPS))
    assert THINK_END_ID in ids
    reasoning, answer = tokenizer.decode(ids, skip_special_tokens=False).split("</think>", 1)
    assert reasoning.strip() and answer.startswith("\n\n")
    off = chat(tokenizer, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert THINK_END_ID not in toks(session.generate("th2", off, 60, stop_ids=STOPS))
    knobs(think=True)
    forced = tokenizer.decode(toks(session.generate("th3", off, CAP)), skip_special_tokens=False)
    assert forced.startswith("<think>\n") and "\n</think>\n\n" in forced


TOOLS_PROMPT = (
    "<|im_start|>system\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": '
    '{"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}}, '
    '"required": ["location", "days"]}}}\n'
    "</tools>\n<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)


def test_tools_in_the_system_turn_give_a_qwen35_tool_call(session: RuntimeSession, tokenizer: Tokenizer) -> None:
    events = session.generate("tool", chat(tokenizer, TOOLS_PROMPT), CAP, stop_ids=STOPS)
    assert events[-1]["reason"] == "stop"
    ids = toks(events)
    assert ids[0] == TOOL_CALL_ID
    text = tokenizer.decode(ids, skip_special_tokens=False)
    head, value_days = text.split("<parameter=days>\n")
    assert head == "<tool_call>\n<function=get_weather>\n<parameter=location>\nParis\n</parameter>\n"
    days, tail = value_days.split("\n", 1)
    assert days.isdigit() and tail == "</parameter>\n</function>\n</tool_call>"


def test_after_a_tool_response_the_answer_is_plain_text(session: RuntimeSession, tokenizer: Tokenizer,
                                                        knobs: Knobs) -> None:
    prompt = TOOLS_PROMPT + (
        "<tool_call>\n<function=get_weather>\n<parameter=location>\nParis\n</parameter>\n</function>\n"
        "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert TOOL_CALL_ID not in toks(session.generate("resp", chat(tokenizer, prompt), 80, stop_ids=STOPS))
    knobs(tool_call=True)  # the knob forces a call even without tools (to a default tool)
    forced = toks(session.generate("forced", [1, 2], 80, stop_ids=STOPS))
    assert forced[0] == TOOL_CALL_ID
    knobs(tool_call=False)
    assert TOOL_CALL_ID not in toks(session.generate("never", chat(tokenizer, TOOLS_PROMPT), 80, stop_ids=STOPS))


def test_garbage_knob_puts_a_non_json_line_before_the_first_token(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(garbage=True)
    session.send(op="generate", id="gb", prompt_ids=[1], max_new=3)
    assert session.recv()["ev"] == "start"
    _, line = session.recv_raw()
    assert line is not None
    with pytest.raises(ValueError):
        json.loads(line)
    events = session.until("done", "gb")
    assert [e["ev"] for e in events] == ["tok", "tok", "tok", "done"]


def test_slow_first_token_knob_delays_only_the_first_token(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(slow_first_token_s=0.5)
    session.send(op="generate", id="slow", prompt_ids=[1], max_new=3)
    started, event = session.recv_timed()
    assert event["ev"] == "start"
    first, event = session.recv_timed()
    assert event["ev"] == "tok" and first - started >= 0.45
    last, _ = session.recv_timed()
    assert last - first < 0.3
    assert session.until("done", "slow")


def test_hang_knob_stops_tokens_but_pings_still_answer(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(hang=True)
    session.send(op="generate", id="hung", prompt_ids=[1], max_new=3)
    assert session.recv()["ev"] == "start"
    assert session.quiet(0.5)
    session.send(op="ping", id="still")
    assert session.recv() == {"ev": "pong", "id": "still"}
    knobs(hang=False)
    events = session.until("done", "hung")
    assert events[-1]["reason"] == "length" and len(toks(events)) == 3


def test_stdin_eof_cancels_the_running_request_and_exits_0(session: RuntimeSession, knobs: Knobs) -> None:
    knobs(speed=1, stop_rate=0)
    session.send(op="generate", id="last", prompt_ids=[1], max_new=200)
    assert session.recv()["ev"] == "start"
    session.close_stdin()
    assert session.until("done", "last")[-1]["reason"] == "cancelled"
    assert session.recv_raw()[1] is None
    assert session.wait() == 0
