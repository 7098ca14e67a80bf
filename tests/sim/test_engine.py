"""The simulated engine: the v1.1 state rules, checkpoints, and output as a function of the whole state.

These drive :class:`Engine` directly (speed 0, real tokenizer), so properties can be checked over many
random cases; tests/sim/test_session_v11.py holds the same rules to the protocol through adb.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.sim.engine import BadCheckpoint, ContextOverflow, Engine, GenRequest, GenResult, Save
from server.sim.generation import TextModel
from server.sim.simconfig import DECODE_TPS, SimConfig, SimConfigWatcher, write_sim_config
from server.sim.vocab import IM_END_ID, SPECIAL_START_ID, load_tokenizer

MAX_CONTEXT = 1024
NEW = 16  # tokens generated when comparing outputs: plenty to tell two contexts apart
ordinary = st.integers(0, SPECIAL_START_ID - 1)
Sampling = tuple[float, int | None]
SAMPLING = st.sampled_from([(0.0, None), (0.0, 3), (0.8, 11)])  # greedy, greedy with a seed, seeded


@pytest.fixture(scope="module")
def model() -> TextModel:
    return TextModel(load_tokenizer())


@pytest.fixture(scope="module")
def knob_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("engine")
    write_sim_config(folder, {"speed": 0}, merge=False)
    return folder


@pytest.fixture
def knobs(knob_dir: Path) -> Any:
    yield lambda **k: write_sim_config(knob_dir, k)
    write_sim_config(knob_dir, {"speed": 0}, merge=False)


@pytest.fixture
def new_engine(model: TextModel, knob_dir: Path) -> Callable[..., Engine]:
    def make(checkpoints: int = 4) -> Engine:
        return Engine(model, SimConfigWatcher(knob_dir / "sim.json"), precision="fp16", max_context=MAX_CONTEXT,
                      checkpoints=checkpoints)
    return make


def run(engine: Engine, prompt: list[int], max_new: int = NEW, *, on_token: Callable[[int], None] | None = None,
        **fields: Any) -> tuple[list[int], GenResult]:
    """check + run like the session's worker; returns the emitted ids and the result."""
    req = GenRequest(id="r", prompt_ids=list(prompt), max_new=max_new, **fields)
    engine.check(req)
    out: list[int] = []

    def emit(token: int, _t_ms: float) -> None:
        out.append(token)
        if on_token is not None:
            on_token(len(out))

    result = engine.run(req, emit)
    return out, result


def sampled(sampling: Sampling) -> dict[str, Any]:
    return {"temperature": sampling[0], "seed": sampling[1]}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p1=st.lists(ordinary, min_size=1, max_size=40), n1=st.integers(0, 12),
       p2=st.lists(ordinary, max_size=30), sampling=SAMPLING, data=st.data())
def test_same_full_sequence_same_tokens_however_the_state_was_reached(
        new_engine: Callable[..., Engine], p1: list[int], n1: int, p2: list[int], sampling: Sampling,
        data: st.DataObject) -> None:
    kw = sampled(sampling)
    # (b) continuation: p1 generates n1 tokens, then p2 continues from that state
    engine = new_engine()
    t1, _ = run(engine, p1, n1, **kw)
    continued, _ = run(engine, p2, reset=False, **kw)
    full = p1 + t1 + p2
    # (a) reset with the whole sequence
    whole, _ = run(new_engine(), full, **kw)
    assert continued == whole
    # (c) restore: a request over the whole sequence saves at j (and around it), then restores
    j = data.draw(st.integers(1, len(full)), label="j")
    k = data.draw(st.integers(j, len(full)), label="k")
    engine = new_engine()
    around = [Save(2, j - 1)] if j > 1 else []
    saving, result = run(engine, full, save=[Save(0, j), *around], **kw)
    assert saving == whole  # saving does not change the generation
    assert sorted((s.at, s.slot) for s in result.saved) == sorted((s.at, s.slot) for s in [Save(0, j), *around])
    restored, _ = run(engine, full[j:], restore=0, **kw)
    assert restored == whole
    # (d) a restore that saves again further on, then a restore of that
    if k > j:
        run(engine, full[j:], 1, restore=0, save=[Save(1, k)], **kw)
        assert run(engine, full[k:], restore=1, **kw)[0] == whole
    # a state off by one token, either way, gives different tokens
    if j > 1:
        assert run(engine, full[j:], restore=2, **kw)[0] != whole  # one token missing
    if j < len(full):
        run(engine, full, 1, save=[Save(3, j + 1)], **kw)
        assert run(engine, full[j:], restore=3, **kw)[0] != whole  # one token twice


def test_state_after_length_and_stop_is_start_prompt_and_sent_tokens(new_engine: Callable[..., Engine],
                                                                      knobs: Any) -> None:
    engine = new_engine()
    sent, result = run(engine, [1, 2, 3], 5, stop_ids=[IM_END_ID])
    assert result.reason == "length" and engine.phone.live == [1, 2, 3, *sent]
    knobs(stop_rate=1.0, min_tokens=0)
    more, result = run(engine, [4], 200, reset=False, stop_ids=[IM_END_ID])
    assert result.reason == "stop" and len(more) < 200
    assert engine.phone.live == [1, 2, 3, *sent, 4, *more]  # the stop id is not in the state
    assert IM_END_ID not in engine.phone.live


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(ordinary, min_size=1, max_size=30), cut=st.integers(0, 8),
       follow=st.lists(ordinary, min_size=1, max_size=10), sampling=SAMPLING)
def test_after_a_cancel_the_state_is_poisoned(new_engine: Callable[..., Engine], prompt: list[int],
                                                        cut: int, follow: list[int], sampling: Sampling) -> None:
    kw = sampled(sampling)
    engine = new_engine()
    cancel = threading.Event()
    if cut == 0:
        cancel.set()  # before the first token: while the prompt is processed
    sent, result = run(engine, prompt, 20, cancel=cancel,
                       on_token=lambda n: cancel.set() if n >= cut else None, **kw)
    assert result.reason == "cancelled" and len(sent) == cut
    careless = prompt + sent  # what a host that ignores the rule would think the phone holds
    assert engine.phone.live[:-1] == careless and len(engine.phone.live) == len(careless) + 1
    got, _ = run(engine, follow, reset=False, **kw)
    assert got != run(new_engine(), careless + follow, **kw)[0]


def test_a_cancel_before_prefill_ends_poisons_and_writes_no_slot(new_engine: Callable[..., Engine]) -> None:
    engine = new_engine()
    cancel = threading.Event()
    cancel.set()
    sent, result = run(engine, [1, 2, 3], save=[Save(0, 2)], cancel=cancel)
    assert (sent, result.reason, result.saved, result.completion_tokens) == ([], "cancelled", [], 0)
    # at speed 0 the cancel is seen at the save point: 2 tokens processed, then the poison token
    assert engine.phone.live[:2] == [1, 2] and len(engine.phone.live) == 3
    with pytest.raises(BadCheckpoint, match="empty"):
        engine.check(GenRequest(id="x", prompt_ids=[1], max_new=1, restore=0))


def test_an_error_poisons_the_live_state_and_keeps_the_slots(new_engine: Callable[..., Engine]) -> None:
    engine = new_engine()
    sent, _ = run(engine, [5, 6, 7], 4, save=[Save(1, 2)])
    engine.poison()
    assert engine.phone.live[:-1] == [5, 6, 7, *sent] and len(engine.phone.live) == 8
    assert run(engine, [7], restore=1)[0] == run(new_engine(), [5, 6, 7])[0]


@pytest.mark.parametrize(("fields", "match"), [
    ({"restore": 0}, "slot 0 is empty"),
    ({"restore": 4}, "unknown slot 4"),
    ({"restore": -1}, "unknown slot -1"),
    ({"save": [Save(0, 0)]}, "outside the prompt"),
    ({"save": [Save(0, 4)]}, "outside the prompt"),
    ({"save": [Save(4, 1)]}, "unknown slot 4"),
    ({"save": [Save(0, 1), Save(1, 2), Save(2, 3)]}, "at most 2"),
])
def test_bad_checkpoint_requests_are_refused_before_anything_runs(new_engine: Callable[..., Engine],
                                                                  fields: dict[str, Any], match: str) -> None:
    engine = new_engine()
    req = GenRequest(id="x", prompt_ids=[1, 2, 3], max_new=1, **fields)
    with pytest.raises(BadCheckpoint, match=match):
        engine.check(req)


def test_saves_count_from_the_start_of_the_restored_state(new_engine: Callable[..., Engine]) -> None:
    engine = new_engine()
    run(engine, [1, 2, 3, 4, 5], 0, save=[Save(0, 5)])
    for at in (5, 8):  # the slot holds 5: a save must be in (5, 5 + 2]
        with pytest.raises(BadCheckpoint):
            engine.check(GenRequest(id="x", prompt_ids=[6, 7], max_new=1, restore=0, save=[Save(1, at)]))
    _, result = run(engine, [6, 7], 0, restore=0, save=[Save(1, 7), Save(2, 6)])
    assert result.saved == [Save(2, 6), Save(1, 7)]  # written in the order the prompt reaches them
    assert engine.state_tokens(GenRequest(id="y", prompt_ids=[], max_new=1, restore=2)) == 6
    assert engine.state_tokens(GenRequest(id="y", prompt_ids=[], max_new=1, restore=1, reset=False)) == 7


def test_a_restored_state_counts_towards_the_context(new_engine: Callable[..., Engine]) -> None:
    engine = new_engine()
    run(engine, [1] * 1000, 0, save=[Save(0, 1000)])
    with pytest.raises(ContextOverflow):
        engine.check(GenRequest(id="x", prompt_ids=[1] * 25, max_new=1, restore=0))
    sent, result = run(engine, [1] * 20, 10, restore=0)
    assert result.reason == "length" and len(sent) == 4


def test_without_slots_checkpoints_are_refused_by_the_engine(new_engine: Callable[..., Engine]) -> None:
    # The session never passes restore/save to a 0-slot engine (a v1 runtime ignores them); the engine
    # itself still refuses them rather than inventing a slot.
    engine = new_engine(checkpoints=0)
    assert engine.checkpoints == 0
    with pytest.raises(BadCheckpoint, match="no checkpoint slots"):
        engine.check(GenRequest(id="x", prompt_ids=[1], max_new=1, save=[Save(0, 1)]))


@pytest.mark.parametrize("precision", sorted(DECODE_TPS))
def test_default_checkpoint_cost_is_far_below_one_prompt_token(precision: str) -> None:
    cfg = SimConfig()
    assert 0 < cfg.checkpoint_s() * 5 < cfg.decode_step_s(precision) * cfg.prefill_factor
    assert SimConfig(speed=2).checkpoint_s() == cfg.checkpoint_s() / 2  # scaled like every duration
    assert SimConfig(speed=0).checkpoint_s() == 0


def test_restore_and_saves_add_their_cost_to_prefill(new_engine: Callable[..., Engine], knobs: Any) -> None:
    engine = new_engine()
    run(engine, [1, 2, 3], 0, save=[Save(0, 3)])
    knobs(speed=1, decode_tps=1000, prefill_factor=1.0, checkpoint_ms=100)  # 1 ms per prompt token
    _, result = run(engine, list(range(10)), 1, restore=0, save=[Save(1, 5), Save(2, 13)])
    assert result.prefill_ms >= 3 * 100 + 10  # lower bound only: sleeps are never shorter


TEXT_UNITS = st.sampled_from([" the", " answer", "hello", ",", ".", "\n\n", " café", " 東京", " 🦙", "<|im_end|>",
                              "\n<|im_start|>user\n", "<think>\n\n</think>\n\n", "  ", "ab", "12"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(units=st.lists(TEXT_UNITS, min_size=2, max_size=25), data=st.data(), sampling=SAMPLING)
def test_output_is_a_function_of_the_text_not_of_its_tokenization(
        new_engine: Callable[..., Engine], model: TextModel, units: list[str], data: st.DataObject,
        sampling: Sampling) -> None:
    """Design decision 2 of state reuse: a state holding another tokenization of the same text (the host
    reused a live state whose ids differ from the prompt's, text-identical) generates the same tokens,
    whether it is reached by a reset or by a continuation; other text generates other tokens."""
    kw = sampled(sampling)
    text = "".join(units)
    canonical = model.encode_prompt(text)
    cuts = sorted(data.draw(st.sets(st.integers(1, len(text) - 1), max_size=4), label="cuts"))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    split = [i for piece in pieces for i in model.encode_prompt(piece)]
    assert model.text_bytes(split) == model.text_bytes(canonical)
    whole, _ = run(new_engine(), canonical, **kw)
    assert run(new_engine(), split, **kw)[0] == whole
    engine = new_engine()  # continuation: the first pieces' ids live in the state, the rest follows
    run(engine, model.encode_prompt(pieces[0]), 0, **kw)
    rest = [i for piece in pieces[1:] for i in model.encode_prompt(piece)]
    assert run(engine, rest, reset=False, **kw)[0] == whole
    assert run(new_engine(), model.encode_prompt(text + "x"), **kw)[0] != whole


def test_the_answer_knob_says_its_text_verbatim_then_ends_the_turn(new_engine: Callable[..., Engine],
                                                                   model: TextModel, knobs: Any) -> None:
    text = '<script>alert("x")</script> <img src=x onerror=alert(1)> & café'
    knobs(answer=text)
    sent, result = run(new_engine(), model.encode_prompt("<|im_start|>assistant\n"), 200, stop_ids=[IM_END_ID])
    assert result.reason == "stop"
    assert model.text_bytes(sent).decode("utf-8") == text
