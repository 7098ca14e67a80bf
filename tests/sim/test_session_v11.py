"""Session protocol v1.1 (pinned state rules, checkpoints) through the real adb server.

A phone of its own on the shared lab; one session process is shared while it stays healthy, and the
tests that need a fresh process (slots empty, a restart, other slot counts) open their own.
"""

from __future__ import annotations

import queue
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tokenizers import Tokenizer

from server.sim.harness import SimLab, SimPhone
from server.sim.simconfig import write_sim_config
from server.sim.vocab import SPECIAL_START_ID, load_tokenizer
from tests.sim.adb_session import AdbSession
from tests.sim.runtime_proc import ENDOFTEXT, IM_END, toks

BASE = {"speed": 0, "load_s": 0}
CAP = 300
STOPS = [IM_END, ENDOFTEXT]
NEW = 16

Knobs = Callable[..., None]
Open = Callable[[], AdbSession]


@pytest.fixture(scope="module")
def phone(sim_lab: SimLab) -> Iterator[SimPhone]:
    phone = sim_lab.add_phone(sim_config=BASE)
    yield phone
    sim_lab.remove_phone(phone.serial)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer()


@pytest.fixture
def knobs(phone: SimPhone) -> Iterator[Knobs]:
    yield lambda **k: phone.configure(**k)
    write_sim_config(phone.sandbox, BASE, merge=False)


@pytest.fixture
def open_session(sim_lab: SimLab, phone: SimPhone) -> Iterator[Open]:
    """Fresh session processes for one test (closed afterwards); the first event must be `ready`."""
    opened: list[AdbSession] = []

    def open_one() -> AdbSession:
        s = AdbSession(sim_lab.adb_port, phone.serial, max_new=CAP)
        opened.append(s)
        s.ready = s.recv(timeout=60)
        assert s.ready["ev"] == "ready", s.ready
        return s

    yield open_one
    for s in opened:
        s.kill()


class _Shared:
    current: AdbSession | None = None


@pytest.fixture(scope="module")
def shared(phone: SimPhone) -> Iterator[_Shared]:  # closed before the phone goes
    holder = _Shared()
    yield holder
    if holder.current is not None:
        holder.current.kill()


@pytest.fixture
def session(shared: _Shared, sim_lab: SimLab, phone: SimPhone, knobs: Knobs) -> AdbSession:
    """The shared session if alive and idle, else a fresh one."""
    s = shared.current
    if s is not None:
        try:
            s.send(op="ping", id="health")
            if s.recv(timeout=5) == {"ev": "pong", "id": "health"} and s.quiet(0.05):
                return s
        except (OSError, queue.Empty, AssertionError, ValueError):
            pass
        s.kill()
    s = AdbSession(sim_lab.adb_port, phone.serial, max_new=CAP)
    assert s.recv(timeout=60)["ev"] == "ready"
    shared.current = s
    return s


def ids(n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(SPECIAL_START_ID) for _ in range(n)]


def ok(events: list[dict[str, Any]]) -> list[int]:
    """The tokens of a request that must have finished normally."""
    assert events[0]["ev"] == "start" and events[-1]["ev"] == "done", events
    return toks(events)


def refused(events: list[dict[str, Any]], code: str = "bad_request") -> str:
    assert len(events) == 1 and events[0]["ev"] == "error" and events[0]["code"] == code, events
    return str(events[0]["message"])


# --- ready, start, done ---------------------------------------------------------------------------


def test_ready_advertises_the_default_four_slots(open_session: Open) -> None:
    s = open_session()
    assert s.ready["checkpoints"] == 4


def test_save_and_restore_events(session: AdbSession) -> None:
    prompt = ids(10, random.Random(1))
    first = session.generate("s1", prompt, NEW, save=[{"slot": 1, "at": 10}, {"slot": 0, "at": 4}])
    assert first[0] == {"ev": "start", "id": "s1", "prompt_tokens": 10, "state_tokens": 0, "restored": None}
    assert first[-1]["saved"] == [{"slot": 0, "tokens": 4}, {"slot": 1, "tokens": 10}]
    again = session.generate("s2", prompt[4:], NEW, restore=0, save=[{"slot": 2, "at": 7}])
    assert again[0] == {"ev": "start", "id": "s2", "prompt_tokens": 6, "state_tokens": 4, "restored": 0}
    assert again[-1]["saved"] == [{"slot": 2, "tokens": 7}]
    empty_prompt = session.generate("s3", [], NEW, restore=1)
    assert empty_prompt[0]["state_tokens"] == 10 and empty_prompt[0]["restored"] == 1
    assert empty_prompt[-1]["saved"] == [] and empty_prompt[-1]["prompt_tokens"] == 0
    # the same full sequence each time: the same tokens
    assert ok(first) == ok(again) == ok(empty_prompt) == ok(session.generate("s4", prompt[7:], NEW, restore=2))


def test_restore_takes_precedence_over_reset(session: AdbSession) -> None:
    prompt = ids(6, random.Random(2))
    session.generate("p0", prompt, 0, save=[{"slot": 0, "at": 3}])
    session.generate("p1", [1, 2], 5)  # a different live state
    for reset in (True, False):
        events = session.generate(f"p-{reset}", prompt[3:], NEW, restore=0, reset=reset)
        assert events[0]["state_tokens"] == 3
        assert ok(events) == ok(session.generate(f"ref-{reset}", prompt, NEW))


def test_saving_does_not_change_the_generation(session: AdbSession) -> None:
    prompt = ids(12, random.Random(3))
    plain = ok(session.generate("n0", prompt, NEW, temperature=0.7, seed=5))
    saving = session.generate("n1", prompt, NEW, temperature=0.7, seed=5,
                              save=[{"slot": 3, "at": 1}, {"slot": 2, "at": 12}])
    assert ok(saving) == plain and len(saving[-1]["saved"]) == 2


# --- the same sequence, whichever way the state was reached ----------------------------------------


@pytest.mark.parametrize("case", range(6))
def test_reset_continuation_and_restore_give_the_same_tokens(session: AdbSession, tokenizer: Tokenizer,
                                                             case: int) -> None:
    rng = random.Random(100 + case)
    samplings: list[dict[str, Any]] = [{"temperature": 0}, {"temperature": 0.9, "seed": 42}]
    sampling = samplings[case % 2]
    system = "<|im_start|>system\nYou are terse.<|im_end|>\n"
    turn = f"<|im_start|>user\nQuestion {case}: {rng.random()}<|im_end|>\n<|im_start|>assistant\n"
    if case % 3 == 0:
        turn += "<think>\n"  # thinking on: reasoning text, which is steered by the decoded state
    p1 = tokenizer.encode(system + turn, add_special_tokens=False).ids
    # (b) continuation: the first turn's answer stays in the state, then the next turn follows
    t1 = ok(session.generate(f"b1-{case}", p1, rng.randint(0, 30), stop_ids=STOPS, **sampling))
    p2 = [IM_END, *tokenizer.encode("\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n",
                                    add_special_tokens=False).ids]
    continued = session.generate(f"b2-{case}", p2, NEW, reset=False, stop_ids=STOPS, **sampling)
    full = p1 + t1 + p2
    assert continued[0]["state_tokens"] == len(p1) + len(t1)
    # (a) reset with the whole sequence, saving at the system boundary and one token either side
    boundary = len(tokenizer.encode(system, add_special_tokens=False).ids)
    whole = session.generate(f"a-{case}", full, NEW, stop_ids=STOPS,
                             save=[{"slot": 0, "at": boundary}, {"slot": 1, "at": boundary + 1}], **sampling)
    session.generate(f"a2-{case}", full, 0, save=[{"slot": 2, "at": boundary - 1}])
    assert ok(continued) == ok(whole)
    # (c) restore from the boundary, then the rest
    restored = session.generate(f"c-{case}", full[boundary:], NEW, restore=0, stop_ids=STOPS, **sampling)
    assert restored[0]["state_tokens"] == boundary
    assert ok(restored) == ok(whole)
    # a state off by one token, either way: different tokens
    for slot in (1, 2):
        wrong = session.generate(f"w{slot}-{case}", full[boundary:], NEW, restore=slot, stop_ids=STOPS, **sampling)
        assert ok(wrong) != ok(whole)


# --- state_tokens and the state after every kind of request ----------------------------------------


def test_state_tokens_after_each_kind_of_request(session: AdbSession, knobs: Knobs) -> None:
    knobs(stop_rate=0)
    assert session.generate("k1", [5, 6, 7], 4)[0]["state_tokens"] == 0  # reset
    after_length = session.generate("k2", [8], 3, reset=False)  # after done/length: 3 + 4
    assert after_length[0]["state_tokens"] == 7
    knobs(stop_rate=1.0, min_tokens=0)
    stopped = session.generate("k3", [9], 200, reset=False, stop_ids=STOPS)
    assert stopped[-1]["reason"] == "stop"
    after_stop = session.generate("k4", [IM_END], 2, reset=False)  # the stop id is not in the state
    assert after_stop[0]["state_tokens"] == 7 + 1 + 3 + 1 + len(toks(stopped))
    knobs(stop_rate=0)
    session.generate("k5", [1, 2, 3, 4, 5], 2, save=[{"slot": 3, "at": 5}])
    assert session.generate("k6", [6], 2, restore=3)[0]["state_tokens"] == 5  # restore
    assert session.generate("k7", [7], 2, reset=False)[0]["state_tokens"] == 5 + 1 + 2  # after a restore


def test_errors_while_a_request_runs_leave_its_state_alone(session: AdbSession, knobs: Knobs) -> None:
    # `busy` and a malformed line concern other requests: the running one's `done` defines the state
    knobs(speed=1, decode_tps=20, stop_rate=0)  # a second of tokens: the two lines arrive meanwhile
    session.send(op="generate", id="run", prompt_ids=[1, 2], max_new=20)
    assert session.recv()["ev"] == "start"
    session.send(op="generate", id="other", prompt_ids=[3], max_new=1)
    session.send_raw(b"not json\n")
    events = session.until("done", "run")
    errors = [(e["id"], e["code"]) for e in events if e["ev"] == "error"]
    assert errors == [("other", "busy"), (None, "bad_request")]
    assert events[-1]["reason"] == "length"
    knobs(speed=0)
    assert session.generate("next", [4], 1, reset=False)[0]["state_tokens"] == 2 + 20


def _careless_continuation_differs(session: AdbSession, careless: list[int], tag: str) -> None:
    """After an undefined state: held is one more than the careless host thinks, output differs."""
    follow = ids(5, random.Random(tag))
    got = session.generate(f"{tag}-cont", follow, NEW, reset=False)
    assert got[0]["state_tokens"] == len(careless) + 1
    assert ok(got) != ok(session.generate(f"{tag}-ref", careless + follow, NEW))


def test_after_a_cancel_the_state_is_poisoned(session: AdbSession, knobs: Knobs) -> None:
    prompt = ids(8, random.Random(4))
    knobs(speed=1, decode_tps=20, stop_rate=0)
    session.send(op="generate", id="cx", prompt_ids=prompt, max_new=200)
    events = session.until("tok", "cx")
    session.send(op="cancel", id="cx")
    events += session.until("done", "cx")
    assert events[-1]["reason"] == "cancelled"
    knobs(speed=0)
    _careless_continuation_differs(session, prompt + toks(events), "cancel")


@pytest.mark.parametrize("error", ["bad_request", "bad_checkpoint", "context_overflow"])
def test_after_an_error_the_state_is_poisoned(session: AdbSession, error: str) -> None:
    prompt = ids(8, random.Random(error))
    sent = ok(session.generate("e0", prompt, 5))
    if error == "bad_request":
        refused(session.generate("e1", [1], 1, reset=False, temperature="hot"))
    elif error == "bad_checkpoint":
        refused(session.generate("e1", [1], 1, reset=False, save=[{"slot": 0, "at": 1}]))
    else:
        refused(session.generate("e1", [1] * 1020, 1, reset=False), "context_overflow")
    _careless_continuation_differs(session, prompt + sent, error)


# --- refusals -------------------------------------------------------------------------------------


BAD_CHECKPOINTS: list[tuple[dict[str, Any], str]] = [
    ({"restore": 1}, "slot 1 is empty"),
    ({"restore": 4}, "unknown slot 4"),
    ({"restore": -1}, "unknown slot -1"),
    ({"restore": "0"}, "restore must be"),
    ({"restore": True}, "restore must be"),
    ({"restore": 0.0}, "restore must be"),
    ({"save": [{"slot": 1, "at": 0}]}, "outside the prompt"),
    ({"save": [{"slot": 1, "at": 4}]}, "outside the prompt"),
    ({"restore": 0, "save": [{"slot": 1, "at": 2}]}, "outside the prompt"),  # the slot already holds 2
    ({"restore": 0, "save": [{"slot": 1, "at": 6}]}, "outside the prompt"),
    ({"save": [{"slot": 4, "at": 1}]}, "unknown slot 4"),
    ({"save": [{"slot": -1, "at": 1}]}, "unknown slot -1"),
    ({"save": [{"slot": 1, "at": 1}, {"slot": 2, "at": 2}, {"slot": 3, "at": 3}]}, "at most 2"),
    ({"save": {"slot": 1, "at": 1}}, "save must be a list"),
    ({"save": [{"slot": 1}]}, "save must be a list"),
    ({"save": [{"slot": 1, "at": "1"}]}, "save must be a list"),
    ({"save": [[1, 1]]}, "save must be a list"),
]


def test_bad_checkpoint_requests_are_refused_and_nothing_is_generated(open_session: Open) -> None:
    s = open_session()  # fresh: only slot 0 will hold anything
    reference = ok(s.generate("ref", [1, 2, 3], NEW, save=[{"slot": 0, "at": 2}]))
    for n, (fields, message) in enumerate(BAD_CHECKPOINTS):
        events = s.generate(f"bad{n}", [3] if "restore" in fields else [1, 2, 3], NEW, **fields)
        assert message in refused(events), (fields, events)
        s.send(op="ping", id=f"alive{n}")
        assert s.recv() == {"ev": "pong", "id": f"alive{n}"}
    # nothing was written by any of them: slot 0 is intact, the others still empty
    assert ok(s.generate("again", [3], NEW, restore=0)) == reference
    for slot in (1, 2, 3):
        assert "empty" in refused(s.generate(f"empty{slot}", [1], 1, restore=slot))


# --- slot lifetime --------------------------------------------------------------------------------


def test_slots_survive_cancels_and_request_errors(session: AdbSession, knobs: Knobs) -> None:
    prompt = ids(20, random.Random(5))
    reference = ok(session.generate("l0", prompt, NEW, save=[{"slot": 1, "at": 12}]))
    knobs(speed=1, decode_tps=20, stop_rate=0)
    session.send(op="generate", id="l1", prompt_ids=prompt[12:], max_new=200, restore=1)
    session.until("tok", "l1")
    session.send(op="cancel", id="l1")
    assert session.until("done", "l1")[-1]["reason"] == "cancelled"
    knobs(speed=0)
    refused(session.generate("l2", [1], 1, restore=3, save=[{"slot": 1, "at": 0}]))
    refused(session.generate("l3", [1] * 1100, 1), "context_overflow")
    assert ok(session.generate("l4", prompt[12:], NEW, restore=1)) == reference


def test_a_cancel_during_the_prompt_keeps_the_saves_already_made(session: AdbSession, knobs: Knobs) -> None:
    prompt = ids(300, random.Random(6))
    session.generate("m0", [7, 7], 0, save=[{"slot": 2, "at": 2}])  # slot 2: something else before
    knobs(speed=1, decode_tps=100, prefill_factor=1.0)  # 10 ms a prompt token: 3 s for this prompt
    session.send(op="generate", id="m1", prompt_ids=prompt, max_new=4,
                 save=[{"slot": 1, "at": 2}, {"slot": 2, "at": 300}])
    assert session.recv()["ev"] == "start"
    time.sleep(0.5)  # the save at 2 tokens is due at ~25 ms, the one at 300 at ~3 s
    session.send(op="cancel", id="m1")
    done = session.until("done", "m1")[-1]
    assert done["reason"] == "cancelled" and done["saved"] == [{"slot": 1, "tokens": 2}]
    knobs(speed=0)
    assert ok(session.generate("m2", prompt[2:], NEW, restore=1)) == ok(session.generate("m3", prompt, NEW))
    assert ok(session.generate("m4", [], NEW, restore=2)) == ok(session.generate("m5", [7, 7], NEW))


def test_a_restart_empties_the_slots(open_session: Open) -> None:
    first = open_session()
    ok(first.generate("r0", [1, 2, 3], 2, save=[{"slot": 0, "at": 3}]))
    assert first.generate("r1", [], 2, restore=0)[0]["restored"] == 0
    first.close_stdin()
    assert first.wait() == 0
    second = open_session()
    assert "slot 0 is empty" in refused(second.generate("r2", [], 2, restore=0))


# --- slot count -----------------------------------------------------------------------------------


def test_zero_slots_is_a_v1_runtime(open_session: Open, knobs: Knobs) -> None:
    knobs(checkpoints=0)
    s = open_session()
    assert "checkpoints" not in s.ready
    prompt = ids(6, random.Random(7))
    plain = s.generate("v0", prompt, NEW)
    # restore and save are unknown fields to a v1 runtime: ignored, whatever they hold
    for n, fields in enumerate([{"restore": 0, "save": [{"slot": 0, "at": 3}]}, {"restore": "x", "save": 7},
                                {"restore": 99, "save": [{"slot": 9, "at": 99}] * 5}]):
        events = s.generate(f"v{n + 1}", prompt, NEW, **fields)
        assert events[0] == {"ev": "start", "id": f"v{n + 1}", "prompt_tokens": 6, "state_tokens": 0}
        assert "saved" not in events[-1] and ok(events) == ok(plain)
    # reset: false continues from the previous state, not from any slot
    assert s.generate("v9", [1], 1, reset=False, restore=0)[0]["state_tokens"] == 6 + NEW


def test_the_slot_count_is_read_when_the_session_starts(open_session: Open, knobs: Knobs) -> None:
    knobs(checkpoints=2)
    s = open_session()
    assert s.ready["checkpoints"] == 2
    knobs(checkpoints=4)  # the running process keeps its 2 slots
    assert "unknown slot 2 (slots are 0..1)" in refused(s.generate("c0", [1, 2], 1, save=[{"slot": 2, "at": 1}]))
    assert s.generate("c1", [1, 2], 1, save=[{"slot": 1, "at": 1}])[-1]["saved"] == [{"slot": 1, "tokens": 1}]


# --- cost -----------------------------------------------------------------------------------------


def test_restore_and_continuation_pay_prefill_only_for_new_tokens(session: AdbSession, knobs: Knobs) -> None:
    prompt = ids(400, random.Random(8))
    session.generate("t0", prompt, 0, save=[{"slot": 0, "at": 400}])
    knobs(speed=1, decode_tps=50, prefill_factor=1.0, stop_rate=0)  # 20 ms a prompt token: 8 s for 400
    restored = session.generate("t1", [1, 2, 3, 4, 5], 1, restore=0)[-1]
    continued = session.generate("t2", [1, 2, 3, 4, 5], 1, reset=False)[-1]
    for done in (restored, continued):
        assert done["prompt_tokens"] == 5
        assert 5 * 20 <= done["prefill_ms"] < 2000  # 100 ms for the new tokens, nowhere near 8 s


def test_a_save_or_restore_costs_far_less_than_one_prompt_token(session: AdbSession, knobs: Knobs) -> None:
    session.generate("u0", [1, 2, 3], 0, save=[{"slot": 0, "at": 3}])
    knobs(speed=1, decode_tps=2, prefill_factor=1.0)  # 500 ms a prompt token, default 5 ms a checkpoint
    done = session.generate("u1", [4, 5], 1, restore=0, save=[{"slot": 1, "at": 4}, {"slot": 2, "at": 5}])[-1]
    assert 2 * 500 + 3 * 5 <= done["prefill_ms"] < 3 * 500  # 3 checkpoints: less than one more token
    knobs(checkpoint_ms=200, decode_tps=100)  # the knob sets the cost: 3 x 200 ms + 2 x 10 ms
    done = session.generate("u2", [4, 5], 1, restore=0, save=[{"slot": 1, "at": 4}, {"slot": 2, "at": 5}])[-1]
    assert done["prefill_ms"] >= 3 * 200 + 2 * 10
