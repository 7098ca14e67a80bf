"""The phone seam (server/backends/adb/runtime.py): the same behaviour, tested the same way, on both
runtimes, the session (one long-lived process, protocol v1) and the one-shot CLI (one process per
request, text in and out), each started by the Launcher on a simulated phone behind the real adb
server. What a Phone relies on holds for both: token ids and counts in the backend contract, idle at
Finished, cancel, a consumer that leaves, abort and close."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from tokenizers import Tokenizer

from server.backends.adb.discovery import PhoneFacts, discover
from server.backends.adb.launcher import Launcher
from server.backends.adb.retokenize import decode, load_tokenizer
from server.backends.adb.runtime import Runtime
from server.backends.adb.transport import AdbServerClient
from server.backends.base import Event, Finished, GenerationParams, Started, Tokens
from server.errors import PhoneLost
from server.settings import Settings
from server.sim.harness import SimLab, SimPhone
from tests.backends.adb_helpers import knobs

KINDS = ["session", "oneshot"]
PROMPT = "The phone on the desk said"
MODEL = "qwen3.5-0.8b"


@dataclass
class Rig:
    """A simulated phone and a Launcher set to start one kind of runtime on it."""

    kind: str
    sim: SimPhone
    facts: PhoneFacts
    launcher: Launcher
    tokenizer: Tokenizer

    def params(self, rid: str, max_new: int, prompt: str = PROMPT) -> GenerationParams:
        """As the services send it: the prompt's ids, and the end-of-answer ids as stop ids (the
        session stops on those; the one-shot CLI on its manifest's, the same)."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        stop_ids = [self.tokenizer.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        return GenerationParams(rid, MODEL, ids, max_new, stop_ids=[i for i in stop_ids if i is not None])


async def rig_for(lab: SimLab, settings: Settings, kind: str, sim: SimPhone | None = None) -> Rig:
    sim = sim or await asyncio.to_thread(lab.add_phone)
    s = settings.model_copy(update={"device_mode": kind})
    client = AdbServerClient(lab.adb_server, timeout=s.adb_timeout_s)
    facts = await discover(client, sim.serial, s)
    assert facts.model is not None and facts.problem is None
    tokenizer = await asyncio.to_thread(load_tokenizer, facts.model.tokenizer_path)
    return Rig(kind, sim, facts, Launcher(client, sim.serial, s, name=sim.serial), tokenizer)


@pytest.fixture(scope="module", params=KINDS)
async def rig(request: pytest.FixtureRequest, lab: SimLab, settings: Settings) -> Rig:
    return await rig_for(lab, settings, request.param)


@pytest.fixture
async def runtime(rig: Rig) -> AsyncIterator[Runtime]:
    rt = await rig.launcher.start(rig.facts)
    yield rt
    await rt.close()


async def collect(agen: AsyncIterator[Event]) -> list[Event]:
    return [ev async for ev in agen]


def ids_of(events: list[Event]) -> list[int]:
    return [i for ev in events if isinstance(ev, Tokens) for i in ev.ids]


@contextlib.contextmanager
def natural_end(sim: SimPhone) -> Iterator[None]:
    """The simulated runtime ends its answer by itself (a stop id) at the first sentence end after 3
    tokens."""
    sim.configure(stop_rate=1.0, min_tokens=3)
    try:
        yield
    finally:
        sim.configure(stop_rate=0.02, min_tokens=8)  # the simulator's defaults


async def test_the_launcher_starts_the_kind_asked_for(rig: Rig, runtime: Runtime) -> None:
    assert runtime.kind == rig.kind and runtime.alive and runtime.settling is None
    assert runtime.serial == rig.sim.serial


async def test_a_request_is_started_then_token_ids_then_finished_with_the_count(
    rig: Rig, runtime: Runtime
) -> None:
    params = rig.params("r1", 6)  # fewer than min_tokens (8): the runtime cannot end it by itself
    started, *tokens, finished = await collect(runtime.generate(params))
    assert isinstance(started, Started) and started.request_id == "r1" and started.phone == rig.sim.serial
    assert started.prompt_tokens == len(params.prompt_ids)
    assert tokens and all(isinstance(t, Tokens) and t.request_id == "r1" and t.ids for t in tokens)
    ids = ids_of(tokens)
    assert isinstance(finished, Finished) and finished.reason == "length"
    assert finished.completion_tokens == len(ids) == 6
    assert decode(rig.tokenizer, ids).strip() and "\ufffd" not in decode(rig.tokenizer, ids)


async def test_an_answer_that_ends_before_max_new_is_stop_with_what_was_generated(
    rig: Rig, runtime: Runtime
) -> None:
    with natural_end(rig.sim):
        events = await collect(runtime.generate(rig.params("s1", 50)))
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason == "stop"
    assert 3 <= finished.completion_tokens == len(ids_of(events)) < 50


async def test_the_runtime_is_ready_for_the_next_request_when_it_yields_finished(
    rig: Rig, runtime: Runtime
) -> None:
    first = runtime.generate(rig.params("a1", 3))
    async for ev in first:
        if isinstance(ev, Finished):
            break  # the first generator stays open, suspended at Finished
    second = await collect(runtime.generate(rig.params("a2", 3)))
    assert isinstance(second[-1], Finished) and second[-1].completion_tokens == 3
    await first.aclose()  # type: ignore[attr-defined]
    assert runtime.alive


async def test_cancel_ends_the_request_with_cancelled_and_the_runtime_serves_on(
    rig: Rig, runtime: Runtime
) -> None:
    events: list[Event] = []
    with knobs(rig.sim, speed=1):
        async for ev in runtime.generate(rig.params("c1", 200)):
            events.append(ev)
            if isinstance(ev, Tokens):
                await runtime.cancel("c1")
                await runtime.cancel("c1")  # twice is harmless
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.reason == "cancelled"
    assert finished.completion_tokens == len(ids_of(events)) < 200
    assert runtime.alive
    again = await collect(runtime.generate(rig.params("c2", 2)))
    assert isinstance(again[-1], Finished) and again[-1].reason == "length"


async def test_cancelling_another_request_id_changes_nothing(rig: Rig, runtime: Runtime) -> None:
    events: list[Event] = []
    async for ev in runtime.generate(rig.params("o1", 4)):
        events.append(ev)
        if isinstance(ev, Started):
            await runtime.cancel("someone-else")
    assert isinstance(events[-1], Finished) and events[-1].reason == "length"


async def test_a_consumer_that_leaves_stops_the_request_and_the_runtime_serves_on(
    rig: Rig, runtime: Runtime
) -> None:
    with knobs(rig.sim, speed=1):
        agen = runtime.generate(rig.params("l1", 200))
        async for ev in agen:
            if isinstance(ev, Tokens):
                break
        await agen.aclose()  # type: ignore[attr-defined]
    if runtime.settling is not None:  # the phone still winding down (bounded by cancel_timeout_s)
        await asyncio.wait_for(runtime.settling, 10)
    assert runtime.alive
    again = await collect(runtime.generate(rig.params("l2", 2)))
    assert isinstance(again[-1], Finished) and again[-1].completion_tokens == 2


async def test_abort_ends_the_runtime_and_fails_the_request_in_flight(rig: Rig, runtime: Runtime) -> None:
    with knobs(rig.sim, speed=1), pytest.raises(PhoneLost):
        async for ev in runtime.generate(rig.params("x1", 200)):
            if isinstance(ev, Tokens):
                runtime.abort("pulled the plug")
    assert not runtime.alive
    assert "pulled the plug" in await asyncio.wait_for(runtime.wait_closed(), 10)
    with pytest.raises(PhoneLost):
        await collect(runtime.generate(rig.params("x2", 2)))


async def test_close_ends_an_idle_runtime(rig: Rig, runtime: Runtime) -> None:
    await collect(runtime.generate(rig.params("z1", 2)))
    await runtime.close()
    assert not runtime.alive
    assert await asyncio.wait_for(runtime.wait_closed(), 10)
    with pytest.raises(PhoneLost):
        await collect(runtime.generate(rig.params("z2", 2)))


async def test_both_runtimes_give_the_same_greedy_answer(lab: SimLab, settings: Settings) -> None:
    """Same phone, same prompt: the session's token ids and the one-shot CLI's text retokenized agree."""
    sim = await asyncio.to_thread(lab.add_phone)
    answers = {}
    for kind in KINDS:
        rig = await rig_for(lab, settings, kind, sim)
        rt = await rig.launcher.start(rig.facts)
        try:
            answers[kind] = ids_of(await collect(rt.generate(rig.params(kind, 7))))
        finally:
            await rt.close()
    assert len(answers["session"]) == 7 and answers["oneshot"] == answers["session"]
