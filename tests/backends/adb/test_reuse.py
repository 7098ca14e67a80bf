"""State reuse, the pure part (server/backends/adb/reuse.py): start points, saves, slot replacement,
and the host's bookkeeping, held against the simulated phone's own state rules (server/sim/state.py,
the v1.1 protocol's reference) over random request sequences. Real Qwen3.5 tokenizer, no phone."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.backends.adb.retokenize import load_tokenizer, token_bytes
from server.backends.adb.reuse import (
    MAX_SAVES,
    Plan,
    Protect,
    Slot,
    Start,
    Tracker,
    match,
    pick_slot,
    plan_saves,
    plan_start,
)
from server.backends.base import Boundary
from server.sim.state import PhoneState
from server.sim.state import Save as SimSave
from server.sim.vocab import SPECIAL_START_ID, ensure_tokenizer_json

TOKENIZER = load_tokenizer(str(ensure_tokenizer_json()))
_text = token_bytes(TOKENIZER)
assert _text is not None
TEXT = _text
SPECIALS = frozenset(TOKENIZER.get_added_tokens_decoder())

UNITS = st.sampled_from([
    " the", " answer", "Hello", " world", ",", ".", "\n\n", " \n", "  ", " café", " 東京", " 🦙", "ab", "12",
    "<|im_end|>", "\n<|im_start|>user\n", "\n<|im_start|>assistant\n", "<think>\n\n</think>\n\n", "e\u0301",
])
ordinary = st.integers(0, SPECIAL_START_ID - 1)


def enc(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False).ids


def split_enc(text: str, cuts: list[int]) -> list[int]:
    """Another tokenization of ``text``: its pieces between ``cuts`` encoded one by one."""
    cuts = sorted({c for c in cuts if 0 < c < len(text)})
    return [i for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True) for i in enc(text[a:b])]


def text_of(ids: list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """What the model reads: each ordinary token's bytes, each special token as a symbol of its own
    (a special id is not the text that spells it)."""
    out: list[int] = []
    for i in ids:
        out += [256 + i] if i in SPECIALS else list(TEXT(i) or b"")
    return tuple(out)


# --------------------------------------------------------------------------- matching


def test_an_id_prefix_matches_and_leaves_one_token_to_send() -> None:
    assert match((1, 2), [1, 2, 3], None) == 2
    assert match((1, 2, 3), [1, 2, 3], None) is None  # nothing left to send: a state has no logits
    assert match((1, 3), [1, 2, 3], None) is None
    assert match((), [1, 2, 3], None) is None


def test_a_text_identical_state_matches_at_a_token_boundary_of_the_prompt() -> None:
    prompt = enc("Hello world<|im_end|>\n<|im_start|>user\nnext")
    held = tuple(enc("Hello") + enc(" world"))  # generated piece by piece
    end = prompt.index(enc("<|im_end|>")[0])
    assert match(held, prompt, TEXT) == end
    assert match(held, prompt, None) is None or held == tuple(prompt[:end])
    # the text matches but ends inside one of the prompt's tokens: no boundary there
    assert match(tuple(enc("Hello wor")), enc("Hello world!"), TEXT) is None
    assert match(tuple(enc("Hello there")), prompt, TEXT) is None


def test_a_special_token_matches_only_itself_not_the_text_that_spells_it() -> None:
    # the phone held "<|im_end|>" as ordinary tokens (a client's token ids, or text a model wrote); the
    # prompt has the special token there: the same characters, another sequence for the model, so a
    # reset and the reuse would read different things
    spelled = tuple(enc("Hi<|im_end") + enc("|>"))
    prompt = enc("Hi<|im_end|> there")
    assert len(prompt) == 3 and prompt[1] in SPECIALS
    assert match(spelled, prompt, TEXT) is None
    assert plan_start(prompt, spelled, [Slot(spelled)], text=TEXT).kind == "reset"
    # and the other way round: the state holds the special token, the prompt spells it
    assert match(tuple(enc("Hi<|im_end|>")), enc("Hi<|im_end") + enc("|> there"), TEXT) is None
    # the special token itself still matches, text-identical around it
    assert match(tuple(enc("Hi") + enc("<|im_end|>")), prompt, TEXT) == 2
    assert match(tuple(enc("H") + enc("i") + enc("<|im_end|>")), prompt, TEXT) == 2


def spelled(text: str) -> list[int]:
    """``text`` with each special token in it written out as ordinary tokens (``<`` then the rest)."""
    out: list[int] = []
    for i in enc(text):
        written = TOKENIZER.decode([i], skip_special_tokens=False)
        out += enc(written[:1]) + enc(written[1:]) if i in SPECIALS else [i]
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(units=st.lists(UNITS, min_size=1, max_size=12), cut=st.integers(0, 12), spell=st.lists(st.booleans()),
       tail=st.lists(UNITS, max_size=2))
def test_a_state_matches_only_where_the_model_reads_the_same_sequence(
        units: list[str], cut: int, spell: list[bool], tail: list[str]) -> None:
    # states and prompts whose special tokens may be written out as text, on either side: a match is
    # a prefix of what the model reads (special tokens as symbols), never only of the characters
    def tokens(pieces: list[str], flags: list[bool]) -> list[int]:
        return [i for k, piece in enumerate(pieces) for i in (spelled(piece) if k < len(flags) and flags[k]
                                                               else enc(piece))]
    prompt = tokens(units + tail, spell)
    held = tuple(tokens(units[:cut], spell[::-1]))  # spelled elsewhere than in the prompt
    k = match(held, prompt, TEXT)
    if k is not None:
        assert 0 < k < len(prompt) and text_of(prompt[:k]) == text_of(held)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(units=st.lists(UNITS, min_size=1, max_size=20), cut=st.integers(0, 20), cuts=st.lists(st.integers(1, 60)),
       noise=st.lists(ordinary, max_size=3))
def test_match_is_exactly_a_text_prefix_at_a_prompt_token_boundary(
        units: list[str], cut: int, cuts: list[int], noise: list[int]) -> None:
    prompt = enc("".join(units))
    head = "".join(units[:cut])
    held = tuple(split_enc(head, cuts) + noise)
    k = match(held, prompt, TEXT)
    boundaries = [j for j in range(1, len(prompt)) if text_of(prompt[:j]) == text_of(held)]
    if k is None:
        assert not boundaries
    else:
        assert k in boundaries and 0 < k < len(prompt)


# --------------------------------------------------------------------------- plans


def states(prompt_text: str) -> st.SearchStrategy[tuple[int, ...]]:
    """States a phone might hold for a prompt: other tokenizations of a prefix of its text, maybe with
    tokens after it, or unrelated ids."""
    related = st.tuples(st.integers(0, len(prompt_text)), st.lists(st.integers(1, 80), max_size=3),
                        st.lists(ordinary, max_size=2)).map(
        lambda t: tuple(split_enc(prompt_text[: t[0]], t[1]) + t[2]))
    return st.one_of(related, st.lists(ordinary, min_size=1, max_size=6).map(tuple))


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(units=st.lists(UNITS, min_size=1, max_size=25), data=st.data())
def test_a_plan_sends_a_valid_tokenization_of_the_prompt_text(units: list[str], data: st.DataObject) -> None:
    text = "".join(units)
    prompt = enc(text)
    live = data.draw(st.none() | states(text), label="live")
    slots = [data.draw(st.none() | states(text).map(Slot), label=f"slot{i}") for i in range(4)]
    bounds = data.draw(st.lists(st.builds(Boundary, st.integers(0, len(prompt) + 2), st.booleans()), max_size=4))
    tracker = Tracker(4, text=TEXT)
    tracker.live, tracker.slots = live, slots
    plan = tracker.plan(prompt, bounds)
    start = plan.start
    # what the phone runs (the state it starts from + the ids sent) is the prompt's text, and the ids
    # sent are the prompt's own, at least one
    assert text_of(start.held + tuple(plan.send)) == text_of(prompt)
    assert plan.send == prompt[start.covered :] and len(plan.send) >= 1 and plan.cached == start.covered
    assert text_of(start.held) == text_of(prompt[: start.covered])
    if start.kind == "continue":
        assert start.held == live and not start.reset
    elif start.kind == "restore":
        assert start.restore is not None and slots[start.restore] is not None and start.reset
        assert start.held == slots[start.restore].ids  # type: ignore[union-attr]
    else:
        assert start == Start(reset=True)
    # the longest: no state the phone holds would have covered more
    for held in [live, *[s.ids for s in slots if s is not None]]:
        if held is not None:
            assert (match(held, prompt, TEXT) or 0) <= start.covered
    # saves: at most 2, distinct slots, inside the ids sent, at (clamped) boundaries past the start
    assert len(plan.saves) <= MAX_SAVES and len({s.slot for s in plan.saves}) == len(plan.saves)
    sequence = start.held + tuple(plan.send)
    wanted = {min(b.at, len(prompt) - 1) for b in bounds}
    for save in plan.saves:
        assert len(start.held) < save.at < len(sequence)  # never the end: see test_saves_*
        assert save.ids == sequence[: save.at]
        assert save.at - len(start.held) + start.covered in wanted


def test_off_always_resets_and_never_saves() -> None:
    tracker = Tracker(4, text=TEXT, enabled=False)
    tracker.live = (1, 2)
    tracker.slots[0] = Slot((1,))
    plan = tracker.plan([1, 2, 3, 4], [Boundary(2, True), Boundary(3)])
    assert plan == Plan(Start(reset=True), [1, 2, 3, 4])
    assert tracker.reusable([1, 2, 3, 4]) == 0


def test_ties_go_to_the_live_state_then_the_longest_slot() -> None:
    slots: list[Slot | None] = [Slot((1, 2)), Slot((1, 2, 3)), None]
    assert plan_start([1, 2, 3, 4], (1, 2, 3), slots).kind == "continue"
    assert plan_start([1, 2, 3, 4], (1, 2), slots) == Start(reset=True, restore=1, held=(1, 2, 3), covered=3)
    assert plan_start([1, 2, 3, 4], (9,), slots).restore == 1
    assert plan_start([5, 6], (9,), slots) == Start(reset=True)


def test_a_text_identical_state_that_would_leave_less_room_is_not_used() -> None:
    prompt = enc("Hello world<|im_end|>")
    held = tuple(enc("Hello") + enc(" world"))
    if len(held) <= len(prompt) - 1:  # this tokenizer splits it into more ids: it grows the state
        return
    assert plan_start(prompt, held, [], text=TEXT).kind == "continue"
    assert plan_start(prompt, held, [], text=TEXT, max_state=len(prompt)).kind == "reset"


def test_saves_at_the_end_of_the_prompt_are_one_token_earlier_and_not_repeated() -> None:
    prompt = [1, 2, 3, 4, 5]
    saves, touch = plan_saves(prompt, Start(reset=True), [Boundary(5)], [None, None])
    assert [(s.slot, s.at, s.ids) for s in saves] == [(0, 4, (1, 2, 3, 4))] and touch == []
    # the same prompt again: restore that slot, send the last token; the boundary is held already
    start = plan_start(prompt, None, [Slot((1, 2, 3, 4))])
    assert start.restore == 0 and start.covered == 4
    assert plan_saves(prompt, start, [Boundary(5)], [Slot((1, 2, 3, 4)), None]) == ([], [])
    assert plan_saves(prompt, Start(reset=True), [Boundary(5)], [None, Slot((1, 2, 3, 4))]) == ([], [1])


def test_at_most_two_saves_shared_first_then_the_latest() -> None:
    prompt = list(range(1, 21))
    bounds = [Boundary(3), Boundary(8, shared=True), Boundary(12), Boundary(15)]
    saves, _ = plan_saves(prompt, Start(reset=True), bounds, [None] * 4)
    assert sorted((s.at, s.shared) for s in saves) == [(8, True), (15, False)]
    # past the start point only; positions count from the start of the state (here 2 held for 5)
    start = Start(reset=False, held=(1, 2), covered=10)  # (as if text-identical)
    saves, _ = plan_saves(prompt, start, bounds, [None] * 4)
    assert [(s.at, s.ids) for s in saves] == [(2 + 5, (1, 2, *prompt[10:15])), (2 + 2, (1, 2, 11, 12))][::-1]
    assert plan_saves(prompt, Start(reset=True), bounds, []) == ([], [])  # a v1 runtime: no slots


# --------------------------------------------------------------------------- slot replacement


def test_replacement_order_empty_superseded_then_least_recently_used() -> None:
    system = (1, 2, 3)
    conv_a1 = (*system, 10, 11)
    conv_b1 = (*system, 20, 21)
    slots: list[Slot | None] = [Slot(system, shared=True, used=4), Slot(conv_a1, used=5), Slot(conv_b1, used=3),
                                None]
    conv_a2 = (*conv_a1, 12, 13)
    assert pick_slot(slots, conv_a2) == 3  # an empty slot first
    slots[3] = Slot((7, 8), used=9)
    assert pick_slot(slots, conv_a2) == 1  # then the conversation's own boundary it supersedes
    assert pick_slot(slots, (5, 6)) == 2  # else the least recently used of leaves and shared prefixes
    slots[0] = Slot(system, shared=True, used=2)  # a shared prefix no new conversation restored lately
    assert pick_slot(slots, (5, 6)) == 0
    assert pick_slot(slots, (*system, 30)) == 0  # although the new save extends it: shared is never superseded
    # a node other slots extend (not shared) is kept longest, even though the new save supersedes it
    slots = [Slot(system, used=1), Slot(conv_a1, used=2)]
    assert pick_slot(slots, (*system, 30)) == 1
    assert pick_slot(slots, (*conv_a1, 40)) == 1
    # a request that lost its slot replaces only slots unused since the clock it is given
    slots = [Slot(system, shared=True, used=4), Slot(conv_a1, used=6), Slot(conv_b1, used=5)]
    assert pick_slot(slots, (*system, 40), protect=Protect(leaves=4, shared=4)) == 0
    assert pick_slot(slots, (*system, 40), protect=Protect(leaves=5, shared=3)) == 2
    assert pick_slot(slots, (*system, 40), protect=Protect(leaves=3, shared=3)) is None
    assert pick_slot(slots, conv_a2, protect=Protect(leaves=3, shared=3)) == 1  # superseded: always replaceable


def converse(tracker: Tracker, order: list[int], system: list[int]) -> tuple[int, int, list[int]]:
    """Conversations over one system prompt, one turn each in ``order`` on one phone (the reply
    re-rendered without the think block of the generation prompt, as the model's template does): the
    prompt tokens processed, the prompt tokens, and each request's cached tokens."""
    convs: dict[int, list[int]] = {}
    processed = total = 0
    cached: list[int] = []
    for turn, c in enumerate(order):
        history = convs.setdefault(c, list(system))
        history += [2000 + c, 3000 + turn, 3000 + turn, 4]  # a user message
        prompt = [*history, 5, 6]  # the generation prompt, think block included
        plan = tracker.plan(prompt, [Boundary(len(system), shared=True), Boundary(len(history))])
        processed += len(plan.send)
        total += len(prompt)
        cached.append(plan.cached)
        tracker.begin(plan)
        reply = [5000 + turn, 5001 + turn]
        tracker.finish(plan, reply, [(s.slot, s.at) for s in plan.saves])
        history += [5, *reply, 7]
    return processed, total, cached


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(n_slots=st.integers(2, 5), n_convs=st.integers(2, 12), rounds=st.integers(3, 6))
def test_conversations_coming_back_in_turn_keep_their_slots_instead_of_evicting_each_other(
    n_slots: int, n_convs: int, rounds: int
) -> None:
    """The thrash of least-recently-used replacement: n conversations coming back in turn to a phone
    with fewer slots than they need, each save evicting exactly the conversation that comes next. Here
    at least min(n, slots) - 1 conversations keep their own slot, turn after turn (up to the
    protection window of 4 x (slots + 1) requests)."""
    system = list(range(1000, 1040))
    order = [c for _ in range(rounds) for c in range(n_convs)]
    _, _, cached = converse(Tracker(n_slots), order, system)
    last_round = cached[-n_convs:]
    own = sum(1 for k in last_round if k > len(system))
    assert own >= min(n_convs, n_slots) - 1, (n_slots, n_convs, last_round)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(n_slots=st.integers(2, 4), n_convs=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_a_shared_system_prefix_stays_while_new_conversations_keep_coming(n_slots: int, n_convs: int, seed: int) -> None:
    """Returning conversations in random order, and a new conversation every other request: every new
    conversation after the first restores at least the system prompt (the shared prefix outlives the
    conversations' boundaries, which new conversations keep pushing out)."""
    rnd = random.Random(seed)
    system = list(range(1000, 1040))
    order: list[int] = []
    newcomer = 100
    for i in range(30):
        if i % 2:
            order.append(newcomer)
            newcomer += 1
        else:
            order.append(rnd.randrange(n_convs))
    _, _, cached = converse(Tracker(n_slots), order, system)
    firsts = [k for c, k in zip(order, cached, strict=True) if c >= 100]
    assert all(k >= len(system) for k in firsts[1:]), firsts


def test_the_shared_prefix_gives_way_to_the_conversations_that_come_back() -> None:
    """Four conversations on a phone with four slots (benchmarks/state_reuse.py (c)): the system
    prompt serves the first turns, then the slots go to the conversations: from the fourth round on,
    every turn restores its own history."""
    system = list(range(1000, 1040))
    order = [c for _ in range(6) for c in range(4)]
    processed, total, cached = converse(Tracker(4), order, system)
    assert all(k > len(system) for k in cached[12:]), cached
    # least recently used replacement with the shared prefix kept reused only the system prompt
    assert processed < 0.4 * total


# --------------------------------------------------------------------------- bookkeeping vs the phone


def test_only_saves_the_phone_reports_count_and_unwritten_slots_keep_their_state() -> None:
    tracker = Tracker(3)
    tracker.slots = [Slot((1, 2)), Slot((7,)), Slot((8,))]
    plan = tracker.plan([1, 2, 3, 4, 5, 6], [Boundary(3), Boundary(5)])
    # restore slot 0; the later boundary supersedes it, the other takes the least recently used leaf
    assert plan.start.restore == 0 and [(s.slot, s.at) for s in plan.saves] == [(1, 3), (0, 5)]
    tracker.begin(plan)
    assert tracker.slots[:2] == [None, None] and tracker.reusable([1, 2, 3]) == 0  # in flux
    tracker.finish(plan, None, [(1, 3), (2, 4)])  # cancelled after one save; slot 2: not asked for
    # both proven: slot 0 restored, slot 1 saved by a request that resumed from it
    assert tracker.slots == [Slot((1, 2), used=1, proven=True), Slot((1, 2, 3), used=1, proven=True), None]
    assert tracker.live is None
    plan = tracker.plan([1, 2, 3, 4, 5, 6], [Boundary(5)])
    tracker.begin(plan)
    tracker.finish(plan, [9], None)  # no `done` (an error): whether it saved is unknown
    assert plan.saves and tracker.slots[plan.saves[0].slot] is None and tracker.live == (1, 2, 3, 4, 5, 6, 9)
    tracker = Tracker(1)
    tracker.slots = [Slot((1,))]
    plan = tracker.plan([1, 2, 3, 4], [Boundary(3)])
    assert [(s.slot, s.at) for s in plan.saves] == [(0, 3)]
    tracker.begin(plan)
    tracker.finish(plan, [], [(0, 2)])  # written, but not where asked: what it holds is unknown
    assert tracker.slots == [None]

Op = tuple[str, int]  # (what happens, a random number)
OPS = st.lists(st.tuples(st.sampled_from(["turn", "turn", "edit", "other", "cancel", "error", "restart"]),
                         st.integers(0, 10**6)), min_size=1, max_size=30)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=OPS, n_slots=st.integers(0, 4))
def test_the_host_knows_exactly_what_the_phone_holds(ops: list[Op], n_slots: int) -> None:
    """Random requests (new turns, edits, other users, cancels, errors, restarts) run against the
    simulated phone's state rules: whenever the host claims to know the live state or a slot, the
    phone holds exactly that, every start point it plans is accepted (state_tokens agree, saves are
    inside the prompt), and what the phone ends up running is always the prompt."""
    phone = PhoneState(n_slots)
    tracker = Tracker(n_slots, text=TEXT)
    history: list[int] = enc("<|im_start|>system\nBe brief.<|im_end|>\n")
    shared = len(history)
    for what, r in ops:
        rnd = random.Random(r)
        if what == "restart":
            phone, tracker = PhoneState(n_slots), Tracker(n_slots, text=TEXT)
            continue
        if what == "edit" and len(history) > shared + 2:
            history = history[: rnd.randrange(shared, len(history))]
        user = enc(f"<|im_start|>user\nq{r}<|im_end|>\n") if what != "other" else []
        head = history if what != "other" else enc(f"<|im_start|>system\nOther {r}.<|im_end|>\n")
        prompt = [*head, *user, *enc("<|im_start|>assistant\n")]
        plan = tracker.plan(prompt, [Boundary(shared, True), Boundary(len(prompt) - 3)])
        state = phone.start(reset=plan.start.reset, restore=plan.start.restore)
        assert len(state) == plan.state_tokens and tuple(state) == plan.start.held
        phone.check_saves([SimSave(s.slot, s.at) for s in plan.saves], len(state), len(plan.send))
        assert text_of(state + plan.send) == text_of(prompt)
        tracker.begin(plan)
        replaced = {s.slot: phone.slot(s.slot) or [] for s in plan.saves}  # (an empty slot stays unknown)
        for save in sorted(plan.saves, key=lambda s: s.at):
            phone.save(save.slot, (state + plan.send)[: save.at])
        generated = [rnd.randrange(SPECIAL_START_ID) for _ in range(rnd.randint(1, 4))]
        if what == "cancel":  # while the prompt is processed: the saves before that point are written
            written = sorted(plan.saves, key=lambda s: s.at)[: rnd.randint(0, len(plan.saves))]
            for save in plan.saves:
                if save not in written:
                    phone.save(save.slot, replaced[save.slot])
            phone.poison(state + plan.send)
            tracker.finish(plan, None, [(s.slot, s.at) for s in written])
        elif what == "error":
            phone.poison(phone.live)
            tracker.finish(plan, None, None)
        else:
            phone.live = state + plan.send + generated
            tracker.finish(plan, generated, [(s.slot, s.at) for s in plan.saves])
            if what != "other":
                history = [*prompt, *generated, *enc("<|im_end|>\n")]
        if tracker.live is not None:
            assert list(tracker.live) == phone.live
        for i, slot in enumerate(tracker.slots):
            if slot is not None:
                assert phone.slot(i) == list(slot.ids)
        assert tracker.holding().slots == n_slots
