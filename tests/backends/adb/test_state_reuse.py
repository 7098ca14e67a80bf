"""State reuse on one phone, end to end: simulated phones (session protocol v1.1) behind the real adb
server, Qwen3.5 chat prompts from the real tokenizer. What the phone started from is the phone's own
``start.state_tokens`` (``Started.state_tokens``); that the state held the right text is shown by the
reply: greedy replies must be token for token those of a phone that reuses nothing (``state_reuse
off``), and the simulated model's output is a function of the whole text in its state, so any wrong
reuse shows up as another reply."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from tokenizers import Tokenizer

from server.backends.adb.phone import Phone
from server.backends.adb.retokenize import shared_tokenizer
from server.backends.adb.reuse import Slot
from server.backends.adb.session import Session
from server.backends.base import Boundary, Finished, GenerationParams, PhoneState, Started, Tokens
from server.errors import PhoneRequestError
from server.sim.harness import SimLab, SimPhone
from server.sim.vocab import IM_END_ID, IM_START_ID
from tests.backends.adb_helpers import knobs, sim_of, wait_state

MakePhone = Callable[..., Awaitable[Phone]]
MODEL = "qwen3.5-0.8b"
GEN = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # the generation prompt, thinking off
GEN_THINK = "<|im_start|>assistant\n<think>\n"
SYSTEM = "You are a helpful assistant. Answer briefly, in plain words, and never use lists or tables."


@dataclasses.dataclass
class Reply:
    started: Started
    ids: list[int]
    finished: Finished


class Chat:
    """Qwen3.5 chat prompts as the serving layer renders them: the whole text encoded at once, with the
    boundaries it sends (end of the system block, shared; the last message boundary)."""

    def __init__(self, tokenizer: Tokenizer, system: str | None = SYSTEM) -> None:
        self.tok = tokenizer
        self.head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
        self.turns: list[str] = []

    def user(self, text: str) -> Chat:
        self.turns.append(f"<|im_start|>user\n{text}<|im_end|>\n")
        return self

    def assistant(self, reply: list[int], *, as_generated: bool, gen: str = GEN) -> Chat:
        """The phone's reply in the history: exactly as generated (the generation prompt's tail kept),
        or as the model's template renders it (without the think block)."""
        text = self.tok.decode(reply, skip_special_tokens=False)
        if as_generated:
            self.turns.append(gen + text + "<|im_end|>\n")
        else:
            self.turns.append("<|im_start|>assistant\n" + text.rsplit("</think>\n\n", 1)[-1] + "<|im_end|>\n")
        return self

    def prompt(self, gen: str = GEN) -> tuple[list[int], list[Boundary]]:
        ids = self.tok.encode(self.head + "".join(self.turns) + gen, add_special_tokens=False).ids
        starts = [i for i, t in enumerate(ids) if t == IM_START_ID]
        bounds = [Boundary(starts[-1])]
        if self.head and len(starts) > 1:
            bounds.append(Boundary(starts[1], shared=True))
        return ids, bounds

    def fork(self) -> Chat:
        other = Chat(self.tok)
        other.head, other.turns = self.head, list(self.turns)
        return other


_seq = 0


async def ask(phone: Phone, prompt: list[int], bounds: list[Boundary] | None = None, max_new: int = 40,
              **kw: object) -> Reply:
    global _seq
    _seq += 1
    params = GenerationParams(f"r{_seq}", MODEL, list(prompt), max_new, stop_ids=[IM_END_ID],
                              boundaries=bounds or [], **kw)  # type: ignore[arg-type]
    events = [ev async for ev in phone.generate(params)]
    started, finished = events[0], events[-1]
    assert isinstance(started, Started) and isinstance(finished, Finished)
    ids = [i for ev in events if isinstance(ev, Tokens) for i in ev.ids]
    return Reply(started, ids, finished)


@pytest.fixture(scope="module")
def tokenizer(phone: Phone) -> Tokenizer:
    assert phone.model is not None
    return shared_tokenizer(phone.model.tokenizer_path)[0]


@pytest.fixture(scope="module")
async def ref(make_phone: MakePhone) -> Phone:
    """A phone that reuses nothing: the reference replies."""
    return await make_phone(state_reuse="off")


@pytest.fixture
async def fresh(make_phone: MakePhone) -> AsyncIterator[Phone]:
    """A phone of its own (4 checkpoint slots), holding nothing yet."""
    phone = await make_phone()
    yield phone
    await phone.aclose()


def tracker(phone: Phone) -> Session:
    session = phone.runtime
    assert isinstance(session, Session)
    return session


async def same_as_reference(ref: Phone, prompt: list[int], reply: Reply, max_new: int = 40) -> None:
    want = await ask(ref, prompt, max_new=max_new)
    assert want.started.state_tokens == 0 and want.started.cached_tokens == 0
    assert reply.ids == want.ids and reply.finished.reason == want.finished.reason


# --------------------------------------------------------------------------- start points


async def test_continue_restore_and_reset_each_as_the_phone_reports_them(
        fresh: Phone, ref: Phone, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="server.backends.adb.session")
    phone = fresh
    assert phone.health()[0].checkpoint_slots == 4 and phone.prefill_ms_per_token is None
    chat = Chat(tokenizer).user("What is the capital of France?")
    p1, b1 = chat.prompt()
    first = await ask(phone, p1, b1)
    assert (first.started.state_tokens, first.started.cached_tokens) == (0, 0)  # reset: nothing held
    assert first.started.prompt_tokens == first.finished.prompt_tokens == len(p1)
    await same_as_reference(ref, p1, first)
    health = phone.health()[0]
    assert health.state_tokens == len(p1) + len(first.ids) and health.checkpoints_used == 2
    assert phone.prefill_ms_per_token is not None  # measured (about 0 at speed 0)

    # continue: the history as the phone generated it extends its live state
    cont = chat.fork().assistant(first.ids, as_generated=True).user("And of Italy?")
    p2, b2 = cont.prompt()
    expect = phone.reusable(p2)
    second = await ask(phone, p2, b2)
    assert second.started.state_tokens == len(p1) + len(first.ids)
    assert second.started.cached_tokens == expect >= len(p1)
    await same_as_reference(ref, p2, second)

    # restore: the template drops the think block, so only the last message boundary of turn 1 is a
    # prefix (a slot saved then); the live state (turn 2 of the other branch) is not
    tmpl = chat.fork().assistant(first.ids, as_generated=False).user("And of Spain?")
    p3, b3 = tmpl.prompt()
    third = await ask(phone, p3, b3)
    assert third.started.state_tokens == third.started.cached_tokens == b1[0].at
    await same_as_reference(ref, p3, third)

    # the shared system prompt with another user: restore the end of the system block
    other = Chat(tokenizer).user("Name a river in Germany.")
    p4, b4 = other.prompt()
    fourth = await ask(phone, p4, b4)
    assert fourth.started.state_tokens == fourth.started.cached_tokens == b1[1].at
    await same_as_reference(ref, p4, fourth)

    # reset: nothing held is a prefix
    p5, b5 = Chat(tokenizer, system="Be terse.").user("Hi").prompt()
    fifth = await ask(phone, p5, b5)
    assert (fifth.started.state_tokens, fifth.started.cached_tokens) == (0, 0)
    await same_as_reference(ref, p5, fifth)
    assert "runs again from a reset" not in caplog.text  # each start point was right the first time


async def test_a_text_identical_live_state_is_continued(fresh: Phone, ref: Phone, tokenizer: Tokenizer) -> None:
    """The phone's live state holds ids that are not how its text tokenizes as a whole (here the first
    prompt was split mid-word; a real model's replies are another source): it is still continued,
    with the new prompt's own ids after that text, and the reply is the same."""
    chat = Chat(tokenizer).user("Tell me about Copenhagen.")
    whole, _ = chat.prompt()
    text = tokenizer.decode(whole, skip_special_tokens=False)
    cut = text.index("hagen")
    p1 = [*tokenizer.encode(text[:cut], add_special_tokens=False).ids,
          *tokenizer.encode(text[cut:], add_special_tokens=False).ids]
    assert p1 != whole
    first = await ask(fresh, p1)
    p2, b2 = chat.assistant(first.ids, as_generated=True).user("And then?").prompt()
    live = tuple(p1 + first.ids)
    assert tuple(p2[: len(live)]) != live  # no id-prefix: only the text is the same
    second = await ask(fresh, p2, b2)
    assert second.started.state_tokens == len(live)  # continued from the live state
    end = p2.index(IM_END_ID, len(whole))  # the reply's text ends where the prompt's <|im_end|> begins
    assert second.started.cached_tokens == end
    await same_as_reference(ref, p2, second)


async def test_reuse_pays_prefill_only_for_the_tokens_sent(
        lab: SimLab, fresh: Phone, tokenizer: Tokenizer) -> None:
    """The phone's own clock: a continuation of a long conversation processes only the new tokens."""
    chat = Chat(tokenizer, system=SYSTEM * 12).user("Tell me about rivers.")
    p1, b1 = chat.prompt()
    first = await ask(fresh, p1, b1)
    p2, b2 = chat.assistant(first.ids, as_generated=True).user("Shorter.").prompt()
    assert len(p2) > 300
    with knobs(sim_of(lab, fresh), speed=1, decode_tps=50, prefill_factor=1.0, stop_rate=1.0, min_tokens=0):
        second = await ask(fresh, p2, b2, max_new=2)  # 20 ms a prompt token
    sent = len(p2) - second.started.cached_tokens
    assert sent < 30 and second.started.cached_tokens > 250
    # at least the tokens sent; nowhere near the whole prompt (> 6 s), even on a loaded machine
    assert sent * 20 <= second.finished.prefill_ms < len(p2) * 20 / 2


async def test_off_resets_every_request_and_saves_nothing(ref: Phone, tokenizer: Tokenizer) -> None:
    chat = Chat(tokenizer).user("Count to three.")
    p1, b1 = chat.prompt()
    first = await ask(ref, p1, b1)
    p2, b2 = chat.assistant(first.ids, as_generated=True).user("Again.").prompt()
    assert ref.reusable(p2) == 0
    second = await ask(ref, p2, b2)
    assert (second.started.state_tokens, second.started.cached_tokens) == (0, 0)
    health = ref.health()[0]
    assert health.checkpoints_used == 0 and health.checkpoint_slots == 4
    assert health.state_tokens == len(p2) + len(second.ids)  # tracked all the same, for the health


async def test_a_v1_runtime_only_continues(lab: SimLab, make_phone: MakePhone, ref: Phone,
                                           tokenizer: Tokenizer) -> None:
    sim = await asyncio.to_thread(lab.add_phone, sim_config={"checkpoints": 0})
    phone = await make_phone(sim)
    assert phone.health()[0].checkpoint_slots == 0
    chat = Chat(tokenizer).user("What is a phone?")
    p1, b1 = chat.prompt()
    first = await ask(phone, p1, b1)
    assert phone.health()[0].checkpoints_used == 0
    p2, b2 = chat.fork().assistant(first.ids, as_generated=True).user("Why?").prompt()
    second = await ask(phone, p2, b2)
    assert second.started.state_tokens == len(p1) + len(first.ids) and second.started.cached_tokens >= len(p1)
    await same_as_reference(ref, p2, second)
    # the template's history is no continuation, and there is no slot to restore
    p3, b3 = chat.fork().assistant(first.ids, as_generated=False).user("Why?").prompt()
    third = await ask(phone, p3, b3)
    assert (third.started.state_tokens, third.started.cached_tokens) == (0, 0)
    await same_as_reference(ref, p3, third)
    await phone.aclose()


async def test_one_shot_reuses_nothing(make_phone: MakePhone, tokenizer: Tokenizer) -> None:
    phone = await make_phone(device_mode="oneshot")
    chat = Chat(tokenizer).user("Hello there.")
    p1, b1 = chat.prompt()
    first = await ask(phone, p1, b1, max_new=8)
    p2, b2 = chat.assistant(first.ids, as_generated=True).user("More.").prompt()
    assert phone.reusable(p2) == 0
    second = await ask(phone, p2, b2, max_new=8)
    assert second.started.cached_tokens == 0
    health = phone.health()[0]
    assert (health.state_tokens, health.checkpoint_slots, health.checkpoints_used) == (None, 0, 0)
    assert phone.prefill_ms_per_token is None  # one-shot prefill includes the model load: not a cost per token
    await phone.aclose()


# --------------------------------------------------------------------------- invalidation


async def test_a_cancel_leaves_the_live_state_unknown(lab: SimLab, fresh: Phone, ref: Phone,
                                                      tokenizer: Tokenizer) -> None:
    chat = Chat(tokenizer).user("Write a long story.")
    p1, b1 = chat.prompt()
    got: list[int] = []
    with knobs(sim_of(lab, fresh), speed=1, stop_rate=0):
        async for ev in fresh.generate(GenerationParams("cx", MODEL, p1, 200, stop_ids=[IM_END_ID], boundaries=b1)):
            if isinstance(ev, Tokens):
                got += ev.ids
                if len(got) >= 2:
                    await fresh.cancel("cx")
    assert fresh.health()[0].state_tokens is None
    # what a careless host would continue from (the phone's state is poisoned: one token more)
    p2, b2 = chat.assistant(got, as_generated=True).user("Go on.").prompt()
    second = await ask(fresh, p2, b2)
    assert second.started.state_tokens == second.started.cached_tokens == b1[0].at  # the slot, not the live state
    await same_as_reference(ref, p2, second)


async def test_a_request_error_leaves_the_live_state_unknown(fresh: Phone, ref: Phone, tokenizer: Tokenizer) -> None:
    chat = Chat(tokenizer).user("Hello.")
    p1, b1 = chat.prompt()
    first = await ask(fresh, p1, b1)
    with pytest.raises(PhoneRequestError):
        await ask(fresh, [10**9], max_new=1)  # refused by the phone (bad_request): its state is undefined
    assert fresh.health()[0].state_tokens is None and fresh.health()[0].checkpoints_used == 2
    p2, b2 = chat.assistant(first.ids, as_generated=True).user("Bye.").prompt()
    second = await ask(fresh, p2, b2)
    assert second.started.state_tokens == b1[0].at  # restored; the slots survive a request error
    await same_as_reference(ref, p2, second)


async def test_a_restart_empties_the_live_state_and_the_slots(fresh: Phone, ref: Phone, tokenizer: Tokenizer) -> None:
    chat = Chat(tokenizer).user("Hello.")
    p1, b1 = chat.prompt()
    first = await ask(fresh, p1, b1)
    old = fresh.runtime
    assert old is not None
    old.abort("test: the runtime process died")
    await wait_state(fresh, PhoneState.READY)
    for _ in range(200):  # (READY again only once the new session is up; bounded)
        if fresh.runtime is not old:
            break
        await asyncio.sleep(0.05)
    health = fresh.health()[0]
    assert fresh.runtime is not old and (health.state_tokens, health.checkpoints_used) == (None, 0)
    p2, b2 = chat.assistant(first.ids, as_generated=True).user("Bye.").prompt()
    assert fresh.reusable(p2) == 0
    second = await ask(fresh, p2, b2)
    assert (second.started.state_tokens, second.started.cached_tokens) == (0, 0)
    await same_as_reference(ref, p2, second)


@pytest.mark.parametrize("wrong", ["live state", "slot", "refused"])
async def test_a_state_tokens_mismatch_reruns_the_request_from_a_reset(
        fresh: Phone, ref: Phone, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture, wrong: str) -> None:
    """The host's bookkeeping is wrong (as after a bug, or a runtime that lost its state silently): the
    phone's start.state_tokens says so (or the phone refuses a save that its real state puts outside
    the prompt), and the reply is still the right one."""
    chat = Chat(tokenizer).user("Hello.")
    p1, b1 = chat.prompt()
    first = await ask(fresh, p1, b1)
    p2, b2 = chat.assistant(first.ids, as_generated=True).user("Bye.").prompt()
    session = tracker(fresh)
    if wrong == "live state":  # it thinks the phone holds 3 tokens fewer than it does
        assert session.tracker.live is not None
        session.tracker.live = session.tracker.live[:-3]
    else:  # it thinks the live state is unknown and a slot holds a shorter (longer) prefix than it does
        session.tracker.live = None
        slot = next(i for i, s in enumerate(session.tracker.slots) if s is not None and s.ids == tuple(p1[: b1[0].at]))
        session.tracker.slots[slot] = Slot(tuple(p2[: b1[0].at - 3] if wrong == "slot" else p2[: len(p1) + 2]))
    assert fresh.reusable(p2) > 0
    with caplog.at_level(logging.WARNING, logger="server.backends.adb.session"):
        second = await ask(fresh, p2, b2)
    said = "refused its start point" if wrong == "refused" else "the host expected"
    assert "runs again from a reset" in caplog.text and said in caplog.text
    assert (second.started.state_tokens, second.started.cached_tokens) == (0, 0)
    await same_as_reference(ref, p2, second)
    health = fresh.health()[0]  # it holds nothing it is not sure of: the rerun's state only
    assert health.checkpoints_used == 0 and health.state_tokens == len(p2) + len(second.ids)


# --------------------------------------------------------------------------- slots


async def test_slot_eviction_keeps_the_shared_prefix_and_replaces_superseded_boundaries(
        lab: SimLab, make_phone: MakePhone, ref: Phone, tokenizer: Tokenizer) -> None:
    """Three slots, two conversations over one system prompt: B1, A1, A2, B2. A2 supersedes A1's
    boundary, which it replaces although B1's is older (plain LRU would evict B1's), so B2 still
    restores B1's; the shared system prompt stays throughout."""
    sim = await asyncio.to_thread(lab.add_phone, sim_config={"checkpoints": 3})
    phone = await make_phone(sim)
    a, b = Chat(tokenizer).user("Question A one."), Chat(tokenizer).user("Question B one.")
    pb1, bb1 = b.prompt()
    b1 = await ask(phone, pb1, bb1)
    pa1, ba1 = a.prompt()
    a1 = await ask(phone, pa1, ba1)
    assert a1.started.state_tokens == ba1[1].at  # the system block, saved by B1
    pa2, ba2 = a.assistant(a1.ids, as_generated=False).user("Question A two.").prompt()
    a2 = await ask(phone, pa2, ba2)
    assert a2.started.state_tokens == ba1[0].at  # A1's last message boundary
    held = {s.ids for s in tracker(phone).tracker.slots if s is not None}
    assert held == {tuple(pa1[: ba1[1].at]), tuple(pb1[: bb1[0].at]), tuple(pa2[: ba2[0].at])}
    pb2, bb2 = b.assistant(b1.ids, as_generated=False).user("Question B two.").prompt()
    b2 = await ask(phone, pb2, bb2)
    assert b2.started.state_tokens == b2.started.cached_tokens == bb1[0].at
    for prompt, reply in ((pa2, a2), (pb2, b2)):
        await same_as_reference(ref, prompt, reply)
    await phone.aclose()


# --------------------------------------------------------------------------- the same replies


async def conversation_tree(phone: Phone, ref: Phone, sim: SimPhone, tokenizer: Tokenizer, seed: int) -> int:
    """Random conversations on one phone: new turns, edits of an earlier message, regenerations, other
    users and system prompts, thinking on and off, both history renders, now and then a cancel; every
    reply is compared with the reference phone's. Returns the prompt tokens reused."""
    rnd = random.Random(seed)
    systems = [SYSTEM, SYSTEM, "Be terse.", None]
    chats = [Chat(tokenizer, rnd.choice(systems)).user(f"Opening question {i}?") for i in range(3)]
    reused = 0
    for step in range(14):
        i = rnd.randrange(len(chats))
        chat = chats[i]
        action = rnd.choice(["turn", "turn", "turn", "edit", "regenerate", "new"])
        if action == "new":
            chat = chats[i] = Chat(tokenizer, rnd.choice(systems)).user(f"New question {step}?")
        elif action == "edit" and len(chat.turns) > 2:
            chat.turns = chat.turns[: rnd.randrange(1, len(chat.turns) - 1) | 1]  # up to a user turn
            chat.turns[-1] = f"<|im_start|>user\nEdited {step}.<|im_end|>\n"
        gen = rnd.choice([GEN, GEN, GEN_THINK])
        prompt, bounds = chat.prompt(gen)
        if rnd.random() < 0.15:  # a cancel mid-stream
            params = GenerationParams(f"t{seed}-{step}", MODEL, prompt, 40, stop_ids=[IM_END_ID], boundaries=bounds)
            with knobs(sim, speed=1):  # (text knobs stay as the reference phone's)
                async for ev in phone.generate(params):
                    if isinstance(ev, Tokens):
                        await phone.cancel(params.request_id)
            continue
        reply = await ask(phone, prompt, bounds)
        reused += reply.started.cached_tokens
        assert reply.started.cached_tokens < len(prompt)
        await same_as_reference(ref, prompt, reply)
        if action != "regenerate":
            chat.assistant(reply.ids, as_generated=rnd.random() < 0.5, gen=gen)
            chat.user(f"Follow-up {step}.")
    return reused


@pytest.mark.parametrize("slots", [4, 1, 0])
async def test_replies_are_the_same_with_reuse_on_and_off(lab: SimLab, make_phone: MakePhone, ref: Phone,
                                                         tokenizer: Tokenizer, slots: int,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    sim = await asyncio.to_thread(lab.add_phone, sim_config={"checkpoints": slots})
    phone = await make_phone(sim)
    reused = 0
    with caplog.at_level(logging.WARNING, logger="server.backends.adb.session"):
        for seed in range(3):
            reused += await conversation_tree(phone, ref, sim, tokenizer, seed)
    assert reused > 0  # (the test exercised reuse)
    # and every start point was right the first time: a rerun from a reset would hide a wrong plan
    assert "runs again from a reset" not in caplog.text
    await phone.aclose()
