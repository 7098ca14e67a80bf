"""State reuse on one phone under whole workloads (server/backends/adb/reuse.py): many conversations
at once, returning ones, newcomers, regenerations, edits, cancels, errors, forget() and
drop_checkpoints(), with the slot policy's ghosts and protection in play. The host's bookkeeping is
held against the simulated phone's own state rules (server/sim/state.py), and the slot policy against
workloads that once defeated it. Pure logic, no phone; ids stand for tokens (a message is a run of ids
of its own)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.backends.adb.reuse import GHOSTS, Tracker
from server.backends.base import Boundary
from server.sim.state import PhoneState
from server.sim.state import Save as SimSave

SYSTEMS = [[10_000 * (s + 1) + i for i in range(40)] for s in range(2)]
GEN = [1, 3, 4, 5]  # the generation prompt: <|im_start|>assistant\n<think>\n\n</think>\n\n
CONTEXT = 1024


@dataclass
class Conversation:
    """A chat over one of two system prompts: its history as the next prompt renders it."""

    system: int
    history: list[int] = field(default_factory=list)
    last: list[int] | None = None  # the last prompt sent (a regeneration sends it again)

    def __post_init__(self) -> None:
        self.history = list(SYSTEMS[self.system])

    def ask(self, r: int, size: int = 12) -> list[int]:
        self.history = [*self.history, 1, *[100_000 + (r * 37 + i) % 50_000 for i in range(size)], 2]
        self.last = [*self.history, *GEN]
        return self.last

    def answer(self, reply: list[int]) -> None:
        self.history = [*self.history, 1, 3, *reply, 2]  # re-rendered without the think block

    def edit(self, r: int) -> None:
        """Drops the history back to an earlier message boundary (at least the system prompt)."""
        cuts = [i + 1 for i, t in enumerate(self.history) if t == 2 and i >= len(SYSTEMS[self.system])]
        self.history = self.history[: random.Random(r).choice([len(SYSTEMS[self.system]), *cuts])]

    def boundaries(self, prompt: list[int]) -> list[Boundary]:
        return [Boundary(len(SYSTEMS[self.system]), shared=True), Boundary(len(prompt) - len(GEN))]


Step = tuple[str, int, int]  # (what happens, which conversation, a random number)
STEPS = st.lists(
    st.tuples(
        st.sampled_from(["turn", "turn", "turn", "new", "regen", "edit", "cancel", "error", "misplaced", "forget",
                         "drop"]),
        st.integers(0, 7), st.integers(0, 10**6)),
    min_size=8, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=STEPS, n_slots=st.integers(0, 4))
def test_the_host_knows_exactly_what_the_phone_holds_under_many_conversations(steps: list[Step], n_slots: int) -> None:
    """Up to eight conversations over two system prompts share one phone with few slots, so that saves
    replace each other's states, ghosts pile up and returning conversations are held back (and a runtime
    sometimes saves elsewhere than asked, and says so). Whenever the
    host claims to know the live state or a slot, the phone holds exactly that; every plan is one the
    phone accepts (its start state, saves inside the prompt, in distinct slots); what it runs is the
    prompt; and the ghosts stay within their bound."""
    phone = PhoneState(n_slots)
    tracker = Tracker(n_slots)
    convs: dict[int, Conversation] = {}
    newcomers = 100
    for what, c, r in steps:
        rnd = random.Random(r)
        if what == "forget":
            tracker.forget()
            continue
        if what == "drop":  # the runtime refused its saves: no checkpoints from now on (the phone keeps its slots)
            tracker.drop_checkpoints()
            continue
        if what == "new":
            c, newcomers = newcomers, newcomers + 1
        conv = convs.setdefault(c, Conversation(system=c % 2))
        if what == "edit":
            conv.edit(r)
        if len(conv.history) > CONTEXT // 2:  # a new chat instead of one past the context
            conv = convs[c] = Conversation(system=c % 2)
        prompt = conv.last if what == "regen" and conv.last is not None else conv.ask(r, rnd.randint(1, 30))
        plan = tracker.plan(prompt, conv.boundaries(prompt), max_state=CONTEXT - 16)
        state = phone.start(reset=plan.start.reset, restore=plan.start.restore)
        assert tuple(state) == plan.start.held and len(state) == plan.state_tokens
        assert state + plan.send == prompt  # ids only here: what the phone runs is the prompt itself
        phone.check_saves([SimSave(s.slot, s.at) for s in plan.saves], len(state), len(plan.send))
        assert len({s.slot for s in plan.saves}) == len(plan.saves)
        tracker.begin(plan)
        before = {s.slot: phone.slot(s.slot) for s in plan.saves}
        saved = [(s.slot, max(len(state) + 1, s.at - 1) if what == "misplaced" else s.at) for s in plan.saves]
        for slot, at in saved:  # "misplaced": a runtime that saves a token early, and says so
            phone.save(slot, (state + plan.send)[:at])
        reply = [rnd.randrange(60_000, 90_000) for _ in range(rnd.randint(1, 8))]
        if what == "cancel":  # while the prompt is processed: the saves before that point are written
            written = sorted(plan.saves, key=lambda s: s.at)[: rnd.randint(0, len(plan.saves))]
            for save in plan.saves:
                if save not in written:
                    phone.save(save.slot, before[save.slot] or [])  # (an empty slot stays unknown to the host)
            phone.poison(state + plan.send)
            tracker.finish(plan, None, [(s.slot, s.at) for s in written])
        elif what == "error":  # no `done`: whether it saved is unknown to the host
            phone.poison(phone.live)
            tracker.finish(plan, None, None)
        else:
            phone.live = state + plan.send + reply
            tracker.finish(plan, reply, saved)
            if what not in ("regen", "misplaced"):
                conv.answer(reply)
        if tracker.live is not None:
            assert list(tracker.live) == phone.live
        for i, slot in enumerate(tracker.slots):
            if slot is not None:
                assert phone.slot(i) == list(slot.ids), (i, slot)
        assert len(tracker.ghosts) <= GHOSTS
        assert all(len(ids) < CONTEXT for ids, *_ in tracker.ghosts)
        held = [s.ids for s in tracker.slots if s is not None]
        assert len(set(held)) == len(held)  # no state saved twice


# --------------------------------------------------------------------------- the slot policy's workloads

SYSTEM = list(range(1000, 1040))


class Phone:
    """Chat turns over one system prompt on one phone, as the pure policy sees them: each turn a user
    message, the reply re-rendered without the think block; what each request reused."""

    def __init__(self, slots: int) -> None:
        self.tracker = Tracker(slots)
        self.histories: dict[int, list[int]] = {}
        self.requests = 0

    def turn(self, conv: int) -> int:
        """One turn of conversation ``conv`` (a new one if unseen): the prompt tokens it did not process."""
        history = self.histories.setdefault(conv, list(SYSTEM))
        history += [2000 + conv, 3000 + self.requests, 3000 + self.requests, 4]
        prompt = [*history, 5, 6]
        plan = self.tracker.plan(prompt, [Boundary(len(SYSTEM), shared=True), Boundary(len(history))])
        self.tracker.begin(plan)
        reply = [5000 + self.requests, 5001 + self.requests]
        self.tracker.finish(plan, reply, [(s.slot, s.at) for s in plan.saves])
        history += [5, *reply, 7]
        self.requests += 1
        return plan.cached

    def regular_among_one_shots(self, gaps: list[int]) -> list[int]:
        """Conversation 0 takes a turn, then ``gaps[i]`` one-shot requests (new conversations over the same
        system prompt) come before its next: what each of its turns reused."""
        reused, newcomer = [], 100
        for gap in gaps:
            reused.append(self.turn(0))
            for _ in range(gap):
                self.turn(newcomer)
                newcomer += 1
        return reused


def test_a_conversation_that_lost_its_slot_to_one_shot_requests_gets_it_back() -> None:
    """Four slots: the shared system prompt, and three for conversations. A chat comes back after every
    one-shot request; once, three one-shots come in a row and push it out. Before, it never got a slot
    back: it came back as a ghost, and every slot was 'used since its own', the one-shots' states that
    nobody would ever restore; it processed its whole history at every turn (until 32 replacements
    later its ghost was forgotten). Now it takes the place of a one-shot's state at once."""
    reused = Phone(4).regular_among_one_shots([1, 1, 3, *[1] * 8])
    assert all(k > len(SYSTEM) for k in reused[1:3])  # its own history, turn after turn
    assert reused[3] == len(SYSTEM)  # pushed out: the system prompt only
    assert all(k > len(SYSTEM) for k in reused[4:]), reused


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(n_slots=st.integers(2, 5), data=st.data())
def test_a_conversation_that_keeps_coming_back_is_never_locked_out_by_one_shot_requests(
        n_slots: int, data: st.DataObject) -> None:
    """A chat among one-shot requests, any number of them between its turns (up to more than the phone
    has slots). Its own state survives ``slots - 2`` one-shots (the shared prefix and its own slot
    stay); after more, it misses, and it holds its slot again within two of its turns: whenever the
    three gaps before a turn were that short, the turn restores its own history."""
    gaps = data.draw(st.lists(st.integers(0, n_slots + 1), min_size=4, max_size=30))
    reused = Phone(n_slots).regular_among_one_shots(gaps)
    short = [gap <= n_slots - 2 for gap in gaps]
    for turn in range(3, len(gaps)):
        if all(short[turn - 3 : turn]):
            assert reused[turn] > len(SYSTEM), (turn, gaps, reused)


def test_the_ghosts_stay_bounded_however_many_conversations_pass() -> None:
    """The ghosts are the policy's only memory beyond the slots: at most GHOSTS states per phone, each a
    state a slot held (so within the context), however many conversations come and come back, and
    also when returning conversations mark theirs as proven."""
    phone = Phone(2)
    for turn in range(400):
        phone.turn(turn % 20 if turn % 3 else 1000 + turn)  # 20 conversations in turn and newcomers, two slots
    ghosts = phone.tracker.ghosts
    assert len(ghosts) == GHOSTS and ghosts.maxlen == GHOSTS
    assert all(len(ids) < CONTEXT for ids, *_ in ghosts)
    assert any(proven for *_, proven in ghosts)  # marked by conversations coming back without a slot
    phone.tracker.forget()
    assert not phone.tracker.ghosts
