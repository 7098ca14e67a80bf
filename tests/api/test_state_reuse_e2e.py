"""State reuse cannot change a reply: random conversation trees through the whole stack, twice.

Two servers, each the real stack (official openai client -> uvicorn -> create_app -> pool -> a
private real adb server -> three simulated phones: two with 4 checkpoint slots, one with none, i.e. a
v1 runtime), one with ``--state-reuse on``, the other ``off``. Hypothesis drives random conversation
trees; every step goes to both servers and at temperature 0 every reply must be the same, token for
token (content, reasoning, tool calls, finish_reason, prompt and completion tokens): the simulated
phone's output is a function of the text of its whole state, so a wrong reuse (a state that is not
what the host thinks, a wrong restore, a lost poisoning after a cancel) changes the reply.

Steps: a new conversation (one of several system prompts, or none; tools or not), a new turn, an edit
of an earlier message (a new branch of the tree; the system prompt too), a regeneration (the same
prompt again), tool results sent back after tool calls, thinking on or off per request, streamed or
not, ``n`` = 2 now and then, a stream closed mid-way (a cancel on the phone), a restart of one of the
reuse server's phones between turns, and raw completions that continue a story (the phone's live
state), or repeat it, or are closed mid-way and continued from the text received.

It could pass vacuously if nothing were ever reused, or if the phone's own check (``state_tokens``,
then a rerun from a reset) quietly repaired a wrong plan: the run also asserts that the reuse server
reused (``usage.prompt_tokens_details.cached_tokens``) where the design says it must, that the other
never did, and that no request had to be run again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.api.app import create_app
from server.settings import Settings
from server.sim.harness import SimLab
from tests.api.live_server import BASE_KNOBS, ServerThread, wait_ready

SLOTS = 4  # checkpoint slots of the first two phones of each lab; the third has none (v1)
SYSTEMS = [
    None,
    "You are a terse assistant. Answer in one short sentence.",
    ("You are a helpful travel agent for a small company in Lyon. Be friendly, precise and brief; "
     "when you do not know something, say so and suggest where to look it up."),
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
TOOLSETS: list[list[dict[str, Any]] | None] = [None, None, [WEATHER], [SEARCH, WEATHER]]
QUESTIONS = ["What is the weather in Paris?", "Tell me about phones.", "Why is the sky blue?",
             "Name three rivers in France.", "How do I boil an egg?", "And after that?",
             "Say it again, shorter.",
             "Quelle heure est-il à Tokyo ?", "Write a haiku about batteries 🔋."]
PROMPTS = ["Once upon a time", "Once upon a time there was a phone",
           "Once upon a time there was a phone that", "The weather in Paris"]
MAX_TOKENS = [8, 16, 24, 48]
MORE = ["", " ", " And then", "\n\n", ". Later, "]  # what a client adds to a story before the next part
GENERATION_PROMPT = 7  # tokens of "<|im_start|>assistant\n<think>\n\n</think>\n\n" (thinking off)


# --------------------------------------------------------------------------- the two stacks


@dataclass
class Server:
    base_url: str
    model: str
    settings: Settings
    client: openai.OpenAI

    def devices(self) -> dict[str, dict[str, Any]]:
        data = httpx.get(self.base_url + "/v1/devices", timeout=5).json()["data"]
        return {d["serial"]: d for d in data}

    def wait(self, what: str, predicate: Any, timeout: float = 20.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            devices = self.devices()
            if predicate(devices):
                return devices
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached in {timeout} s: {devices}")
            time.sleep(0.02)

    def wait_idle(self) -> None:
        self.wait("every phone ready and idle", lambda ds: all(
            d["state"] == "ready" and d["request_in_flight"] is None for d in ds.values()))


@dataclass
class Pair:
    on: Server
    off: Server
    on_lab: SimLab
    off_lab: SimLab


# Fast phones whose prompt tokens still cost something: at speed 0 every phone measures ~0 ms per prompt
# token, and the router (expected time to first token) has no reason to prefer the phone holding the
# prompt. Here a prompt token costs 0.25 ms (a real one ~31 ms), a generated one too, a restore or a
# save 0.05 ms (a real one ~5 ms); answers end at random (stop_rate) after 3 tokens.
KNOBS: dict[str, Any] = {**BASE_KNOBS, "speed": 1, "decode_tps": 4000, "prefill_factor": 1.0,
                         "checkpoint_ms": 0.05, "stop_rate": 0.15, "min_tokens": 3}
# for a stream closed after a few chunks: 400 tok/s (200 tokens: 0.5 s), prompt tokens as above
SLOW_DECODE: dict[str, Any] = {"decode_tps": 400, "prefill_factor": 0.1}


def lab() -> SimLab:
    sim = SimLab(phones=0, sim_config=KNOBS)
    sim.start()
    try:
        for _ in range(2):
            sim.add_phone(sim_config={"checkpoints": SLOTS})
        sim.add_phone(sim_config={"checkpoints": 0})
    except BaseException:
        sim.stop()
        raise
    return sim


def server(stack: ExitStack, sim: SimLab, reuse: str) -> Server:
    settings = Settings(adb_servers=[sim.adb_server], sim=0, state_reuse=reuse, sse_ping_s=0.25,
                        device_poll_s=0.2, restart_backoff_max_s=0.2, quarantine_s=0.5, quarantine_max_s=1.0,
                        stall_timeout_s=10.0, cancel_timeout_s=5.0)
    st_ = stack.enter_context(ServerThread(create_app(settings)))
    base = f"http://127.0.0.1:{st_.port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
    stack.callback(client.close)
    srv = Server(base, wait_ready(base), settings, client)
    srv.wait("three phones ready",
             lambda ds: len(ds) == 3 and all(d["state"] == "ready" for d in ds.values()), timeout=60)
    return srv


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with ExitStack() as stack:
        on_lab = lab()
        stack.callback(on_lab.stop)
        off_lab = lab()
        stack.callback(off_lab.stop)
        on, off = server(stack, on_lab, "on"), server(stack, off_lab, "off")
        for srv in (on, off):
            assert sorted(d["checkpoint_slots"] for d in srv.devices().values()) == [0, SLOTS, SLOTS]
        yield Pair(on, off, on_lab, off_lab)


# --------------------------------------------------------------------------- one request, both servers


@dataclass(frozen=True)
class Reply:
    """What must be the same with state reuse on and off (and what may differ: ``cached``, the tool call
    ids, the phones)."""

    content: str | None
    reasoning: str | None
    tool_calls: tuple[tuple[str, str], ...]  # (name, arguments); ids are random by design
    finish: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: int = field(compare=False)
    ids: tuple[str, ...] = field(compare=False, default=())
    phones: tuple[str, ...] = field(compare=False, default=())  # the serial of each choice's phone


def cached_of(usage: Any) -> int:
    details = usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None, usage
    assert 0 <= details.cached_tokens <= usage.prompt_tokens, usage
    return int(details.cached_tokens)


def chat(srv: Server, body: dict[str, Any], stream: bool) -> list[Reply]:
    """One chat request; one Reply per choice."""
    body = {**body, "extra_body": {**body.get("extra_body", {}), "return_timings": True}}
    if not stream:
        r = srv.client.chat.completions.create(model=srv.model, **body)
        assert r.usage is not None
        n = len(r.choices)
        cached = cached_of(r.usage)
        phones = served_by((r.model_extra or {})["timings"])
        # n > 1: the prompt is counted once, completion tokens are the sum over choices
        return [Reply(c.message.content, (c.message.model_extra or {}).get("reasoning_content"),
                      tuple((t.function.name, t.function.arguments) for t in c.message.tool_calls or []),
                      c.finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens // n if n > 1 else
                      r.usage.completion_tokens, cached,
                      tuple(t.id for t in c.message.tool_calls or []), phones)
                for c in sorted(r.choices, key=lambda c: c.index)]
    content: str | None = None
    reasoning: str | None = None
    calls: dict[int, list[str]] = {}
    finish, usage, phones = None, None, ()
    for chunk in srv.client.chat.completions.create(model=srv.model, stream=True,
                                                    stream_options={"include_usage": True}, **body):
        if chunk.usage is not None:
            usage = chunk.usage
        if (chunk.model_extra or {}).get("timings"):
            phones = served_by((chunk.model_extra or {})["timings"])
        for c in chunk.choices:
            d = c.delta
            if d.content:
                content = (content or "") + d.content
            extra = (d.model_extra or {}).get("reasoning_content")
            if extra:
                reasoning = (reasoning or "") + extra
            for tc in d.tool_calls or []:
                entry = calls.setdefault(tc.index, ["", "", ""])
                if tc.id:
                    entry[2] = tc.id
                if tc.function and tc.function.name:
                    entry[0] += tc.function.name
                if tc.function and tc.function.arguments:
                    entry[1] += tc.function.arguments
            finish = c.finish_reason or finish
    assert usage is not None
    ordered = [calls[i] for i in sorted(calls)]
    # streamed, a reply with calls and no text has no content at all; non-streamed it is null too
    return [Reply(content, reasoning, tuple((c[0], c[1]) for c in ordered), finish, usage.prompt_tokens,
                  usage.completion_tokens, cached_of(usage), tuple(c[2] for c in ordered), phones)]


def served_by(timings: dict[str, Any]) -> tuple[str, ...]:
    """The phones of a response's choices, from its ``timings`` (extension ``return_timings``)."""
    return tuple(t["phone"] for t in timings["choices"]) if "choices" in timings else (timings["phone"],)


def close_early(srv: Server, body: dict[str, Any], chunks: int) -> str:
    """Stream a request (chat with ``messages``, else a completion) of up to 200 tokens and close the
    stream after ``chunks`` chunks: the server cancels it on the phone. Returns the text received
    (content and reasoning)."""
    text = ""
    body = {**body, "max_completion_tokens" if "messages" in body else "max_tokens": 200, "temperature": 0}
    stream: Any
    if "messages" in body:
        stream = srv.client.chat.completions.create(model=srv.model, stream=True, **body)
    else:
        stream = srv.client.completions.create(model=srv.model, stream=True, **body)
    try:
        for i, chunk in enumerate(stream):
            for c in chunk.choices:
                if "messages" in body:
                    reasoning = (c.delta.model_extra or {}).get("reasoning_content")
                    text += (c.delta.content or "") + (reasoning or "")
                else:
                    text += c.text
            if i + 1 >= chunks:
                break
    finally:
        stream.close()
    return text


@contextmanager
def slow_decode(pair: Pair) -> Iterator[None]:
    """Phones slow enough for a stream closed after a few chunks to be closed mid-way."""
    phones = pair.on_lab.phones + pair.off_lab.phones
    for p in phones:
        p.configure(**SLOW_DECODE)
    try:
        yield
    finally:
        for p in phones:
            p.configure(**{k: KNOBS[k] for k in SLOW_DECODE})


def complete(srv: Server, prompt: str, max_tokens: int) -> Reply:
    r = srv.client.completions.create(model=srv.model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    assert r.usage is not None
    return Reply(r.choices[0].text, None, (), r.choices[0].finish_reason, r.usage.prompt_tokens,
                 r.usage.completion_tokens, cached_of(r.usage))


# --------------------------------------------------------------------------- the conversation tree


@dataclass
class Conversation:
    messages: list[dict[str, Any]]  # ends with a user or tool message (a prompt) or an assistant reply
    tools: list[dict[str, Any]] | None
    replies: int = 0  # assistant replies in ``messages``
    phone: str | None = None  # the reuse server's phone of the last reply (n = 1; None: unknown or restarted)

    def pending_calls(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "assistant" \
            and bool(self.messages[-1].get("tool_calls"))


@dataclass
class Stats:
    """What the run did (the failure note), and the counts behind the reuse assertions."""

    requests: int = 0
    cached: int = 0  # sum of the reuse server's cached_tokens
    off_cached: int = 0  # ... and of the other's
    followups: int = 0  # new turns (n = 1) of a conversation that already has a reply
    followups_hit: int = 0  # ... that reused something
    expected: int = 0  # ... whose previous reply ran on a phone with slots that did not restart since
    expected_hit: int = 0
    immediate: int = 0  # ... of which the previous reply was the reuse server's last request
    immediate_hit: int = 0
    continued: int = 0  # completions continuing the prompt and text of the reuse server's last request
    continued_hit: int = 0
    cancels: int = 0
    restarts: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per kind of step
    misses: list[str] = field(default_factory=list, repr=False)
    last: object = field(default=None, repr=False)  # what the reuse server's last request continued
    log: list[str] = field(default_factory=list, repr=False)  # this example's steps (for a miss's note)


def assistant_message(reply: Reply, with_reasoning: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": reply.content}
    if with_reasoning and reply.reasoning:
        msg["reasoning_content"] = reply.reasoning
    if reply.tool_calls:
        msg["tool_calls"] = [{"id": cid, "type": "function", "function": {"name": name, "arguments": args}}
                             for cid, (name, args) in zip(reply.ids, reply.tool_calls, strict=True)]
    return msg


def both(pair: Pair, stats: Stats, body: dict[str, Any], stream: bool) -> Reply:
    """Send one chat request to both servers; the replies must be the same. Returns the reuse server's."""
    on = chat(pair.on, body, stream)
    off = chat(pair.off, body, stream)
    assert on == off, f"state reuse changed the reply\nbody={json.dumps(body)[:2000]}\non ={on}\noff={off}"
    stats.requests += 1
    stats.cached += on[0].cached
    stats.off_cached += off[0].cached
    return on[0]


def restart_one(pair: Pair, index: int, convs: list[Conversation]) -> None:
    """Drop the links of the reuse server's phone ``index`` (its session dies, its slots with it) and wait
    until the server has it ready again on a new session."""
    phone = pair.on_lab.phones[index]
    for conv in convs:
        if conv.phone == phone.serial:
            conv.phone = None
    t0 = time.monotonic()
    phone.drop_connections()

    def restarted(ds: dict[str, dict[str, Any]]) -> bool:
        d = ds.get(phone.serial)  # ready again, since after the drop, holding no checkpoint
        return d is not None and d["state"] == "ready" and d["uptime_s"] < time.monotonic() - t0 \
            and d["checkpoints_used"] == 0

    pair.on.wait("the phone restarted", restarted, timeout=20)


def run_steps(pair: Pair, stats: Stats, data: st.DataObject) -> None:
    convs: list[Conversation] = []
    stories: list[str] = []
    stats.log = []
    restarted = False
    steps = data.draw(st.integers(3, 10), label="steps")
    for _ in range(steps):
        actions = ["new"]
        if convs:  # weighted: mostly turns; a restart (slow: a new session) at most once per example
            actions += ["new", *["turn"] * 6, *["edit", "regenerate"] * 2, "cancel", *["write"] * 3]
            actions += [] if restarted else ["restart"]
        action = data.draw(st.sampled_from(actions), label="action")
        stats.kinds[action] = stats.kinds.get(action, 0) + 1
        t0 = time.monotonic()
        stats.last = None if action in ("restart", "cancel") else stats.last
        try:
            step(pair, stats, data, convs, stories, action)
        finally:
            stats.seconds[action] = round(stats.seconds.get(action, 0.0) + time.monotonic() - t0, 2)
        restarted = restarted or action == "restart"


def write(pair: Pair, stats: Stats, data: st.DataObject, stories: list[str]) -> None:
    """A raw completion that continues a story: the prompt is the last one plus the text generated for it
    (so the phone's live state, not a slot, holds most of it, and the text joins may tokenize otherwise
    than the phone generated: text-identical reuse), then some text of the client's. Or the same prompt
    again, or a stream closed early whose text so far (the part both servers sent) is kept, and often
    continued at once (the phone that was cancelled holds an undefined state, not that text)."""
    at = data.draw(st.integers(0, len(stories)), label="story")
    if at == len(stories):
        stories.append(data.draw(st.sampled_from(PROMPTS), label="prompt"))
    cancel = data.draw(st.booleans(), label="cancel")
    while True:
        prompt = stories[at]
        if cancel:
            chunks = data.draw(st.integers(1, 4), label="chunks")
            with slow_decode(pair):
                texts = [close_early(pair.on, {"prompt": prompt}, chunks),
                         close_early(pair.off, {"prompt": prompt}, chunks)]
            short, long_ = sorted(texts, key=len)
            assert long_.startswith(short), texts
            stats.cancels += 1
            text = short
        else:
            max_tokens = data.draw(st.sampled_from(MAX_TOKENS[:3]), label="max_tokens")
            on, off = complete(pair.on, prompt, max_tokens), complete(pair.off, prompt, max_tokens)
            assert on == off, f"state reuse changed the completion of {prompt!r}\non ={on}\noff={off}"
            stats.requests += 1
            stats.cached += on.cached
            stats.off_cached += off.cached
            if stats.last == ("story", at):  # it continues the last request: the phone's live state holds it
                stats.continued += 1
                stats.continued_hit += on.cached > 0
                if on.cached == 0:
                    stats.misses.append(f"story continued: 0/{on.prompt_tokens}; steps: {stats.log[-6:]}")
            stats.log.append(f"write s{at} {on.cached}/{on.prompt_tokens}")
            text = on.content or ""
        stats.last = None
        keep = data.draw(st.integers(0, 3), label="keep") > 0  # else: the same prompt again next time
        # goes on at once (from the phone's live state), or later, or the same prompt again
        go_on = keep and not cancel and data.draw(st.booleans(), label="go on")
        if keep:
            more = " And then" if go_on else data.draw(st.sampled_from(MORE), label="more")
            stories[at] = prompt + text + more
            # The phone's live state is the last prompt and the text generated for it: it matches when the
            # client's text starts a token of its own (" And": a space and a word). Nothing added: the
            # prompt is the live state's text exactly, and a prompt token must be left to send, so the
            # live state cannot be used (recurrent state is not cut back). Punctuation or newlines may
            # merge with the last generated token: the live state then ends inside a prompt token.
            # A text ending in whitespace may be a token cut inside a character (an emoji's first bytes:
            # the server holds them back), and a cancelled request leaves no live state.
            whole = text[-1:].strip() != ""
            stats.last = ("story", at) if more == " And then" and whole and not cancel else None
        if cancel and keep:  # the story goes on from the text received, once the phones are done cancelling
            pair.on.wait_idle()
            pair.off.wait_idle()
        elif not go_on:
            return
        cancel = False


def step(pair: Pair, stats: Stats, data: st.DataObject, convs: list[Conversation], stories: list[str],
         action: str) -> None:
    """One step of the tree walk (run_steps draws which)."""
    if action == "restart":
        restart_one(pair, data.draw(st.integers(0, 2), label="phone"), convs)
        stats.restarts += 1
        return
    if action == "write":
        write(pair, stats, data, stories)
        return

    followup = False
    if action == "new":
        system = data.draw(st.sampled_from(SYSTEMS), label="system")
        conv = Conversation([{"role": "system", "content": system}] if system else [],
                            data.draw(st.sampled_from(TOOLSETS), label="tools"))
        conv.messages.append({"role": "user", "content": data.draw(st.sampled_from(QUESTIONS), label="q")})
        convs.append(conv)
    else:
        conv = convs[data.draw(st.integers(0, len(convs) - 1), label="conversation")]
        if conv.pending_calls():  # an agent answers the calls before anything else
            for i, call in enumerate(conv.messages[-1]["tool_calls"]):
                result = json.dumps({"result": f"{call['function']['name']} #{i}: ok"})
                conv.messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        elif action in ("turn", "cancel"):
            if conv.messages[-1]["role"] == "assistant":
                if conv.replies >= 6:
                    return  # conversations stay within six turns
                followup = action == "turn"
                conv.messages.append({"role": "user", "content": data.draw(st.sampled_from(QUESTIONS),
                                                                            label="q")})
        elif action == "edit":
            editable = [i for i, m in enumerate(conv.messages) if m["role"] in ("system", "user")]
            at = data.draw(st.sampled_from(editable), label="edit at")
            old = conv.messages[at]
            if old["role"] == "system":
                new_system = data.draw(st.sampled_from([s for s in SYSTEMS if s and s != old["content"]]),
                                       label="new system")
                head = [{"role": "system", "content": new_system}] + conv.messages[1:]
                while head[-1]["role"] == "assistant":  # resend up to the last prompt
                    head.pop()
            else:
                text = data.draw(st.sampled_from([q for q in QUESTIONS if q != old["content"]]), label="edit")
                head = [*conv.messages[:at], {"role": "user", "content": text}]
            conv = Conversation(head, conv.tools, sum(1 for m in head if m["role"] == "assistant"))
            convs.append(conv)  # a new branch; the old one stays in the tree
        elif action == "regenerate" and conv.messages[-1]["role"] == "assistant":
            conv.messages.pop()
            conv.replies -= 1
        if conv.pending_calls():
            return  # (an edit that kept unanswered calls: answered next time)

    thinking = data.draw(st.booleans(), label="thinking")
    body: dict[str, Any] = {
        "messages": list(conv.messages), "temperature": 0,
        "max_completion_tokens": data.draw(st.sampled_from(MAX_TOKENS if conv.tools else MAX_TOKENS[:3]),
                                           label="max_tokens"),
        "extra_body": {"chat_template_kwargs": {"enable_thinking": thinking}},
    }
    if conv.tools:
        body["tools"] = conv.tools
    if action == "cancel":
        chunks = data.draw(st.integers(1, 4), label="chunks")
        with slow_decode(pair):
            texts = [close_early(pair.on, body, chunks), close_early(pair.off, body, chunks)]
        short, long_ = sorted(texts, key=len)
        assert long_.startswith(short), texts  # both are beginnings of the same reply
        stats.cancels += 1
        return  # the user gave up: nothing joins the history
    n = data.draw(st.sampled_from([1, 1, 1, 1, 2]), label="n")
    stream = n == 1 and data.draw(st.booleans(), label="stream")
    if n > 1:
        body["n"] = n
    if followup:
        # a user who reads the reply first: the server has handed the phone back by then. (A client that
        # asks again within the server's last microseconds of the previous request may find that phone
        # still leased; at speed 0 a free phone processing the whole prompt is then rightly faster.)
        pair.on.wait_idle()
    reply = both(pair, stats, body, stream)
    if followup and n == 1:  # (n > 1: cached_tokens is the fewest over choices, each on a phone of its own)
        stats.followups += 1
        stats.followups_hit += reply.cached > 0
        if conv.phone is not None and conv.phone != pair.on_lab.phones[2].serial:
            stats.expected += 1
            stats.expected_hit += reply.cached > 0
            if stats.last is conv:
                stats.immediate += 1
                stats.immediate_hit += reply.cached > 0
        if reply.cached == 0:
            stats.misses.append(f"after {conv.phone} on {reply.phones} stream={stream} "
                                f"cached={reply.cached}/{reply.prompt_tokens}; steps: {stats.log[-6:]}")
    conv.phone = reply.phones[0] if n == 1 else None
    stats.last = conv
    stats.log.append(f"{action} c{convs.index(conv)} {reply.phones} {reply.cached}/{reply.prompt_tokens}")
    conv.messages.append(assistant_message(reply, data.draw(st.booleans(), label="send reasoning back")))
    conv.replies += 1


def test_replies_are_the_same_with_state_reuse_on_and_off(pair: Pair,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    stats = Stats()
    caplog.set_level(logging.WARNING)

    @settings(max_examples=14, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def conversations(data: st.DataObject) -> None:
        try:
            run_steps(pair, stats, data)
        finally:
            pair.on.wait_idle()  # a cancelled request may still be winding down
            pair.off.wait_idle()

    conversations()
    note = f"{stats}\nfollow-ups that reused nothing:\n" + "\n".join(stats.misses)
    assert stats.requests >= 20, note
    # a session aborted by an exception on the way (in a cancel's bookkeeping, say) is restarted and the
    # replies still agree: the server's own account must be clean too
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    # every start point was right the first time: the phone's state_tokens check and its rerun from a
    # reset would otherwise hide a wrong plan (the reply would still agree)
    wrong = [r.getMessage() for r in caplog.records if "from a reset" in r.getMessage()
             or "the host expected" in r.getMessage()]
    assert not wrong, wrong
    assert stats.off_cached == 0, note  # off: every request starts from an empty state
    assert stats.cached > 0, note  # on: reuse did happen, so the equality above is not vacuous
    # A follow-up right after its conversation's previous reply, which ran on a phone with slots, finds
    # that reply's last message boundary in a slot (the live state is no prefix: the template drops the
    # empty think block). Later follow-ups may find it evicted (4 slots, shared prefixes kept longest);
    # after a reply on the v1 phone there is nothing to find (history_render template).
    assert stats.immediate_hit == stats.immediate, note
    assert stats.expected_hit >= 0.5 * stats.expected, note
    # a story's next part, right after the last, continues the live state of the phone that wrote it (a
    # v1 phone too), as the same ids or, where the text joins tokenize otherwise, text-identical
    assert stats.continued_hit == stats.continued, note


def test_a_six_turn_chat_reuses_on_every_turn_and_says_the_same(pair: Pair) -> None:
    """The issue's chat, at temperature 0: every turn reuses what a phone holds (the first, the system
    block another user's chat left; the next ones, a slot at the previous turn's last message boundary),
    and the replies are those without reuse."""
    pair.on.wait_idle()
    pair.off.wait_idle()
    system = ("You are the assistant of a small bakery in Lyon. Answer questions about bread, opening hours "
              "and orders in one or two sentences; never invent prices.")
    # three other users at once: the phones they ran on keep the system block (shared). Usually one on
    # each phone; on a loaded machine one may end before the next arrives, which then rather reuses the
    # block on that phone (prefix-aware routing): either way the chat's first turn finds it on a phone
    with ThreadPoolExecutor(3) as pool:
        warm = list(pool.map(lambda q: chat(pair.on, {"messages": [{"role": "system", "content": system},
                                                                  {"role": "user", "content": q}],
                                                     "temperature": 0, "max_completion_tokens": 4}, False)[0],
                             QUESTIONS[6:9]))
    assert len(warm) == 3 and all(r.completion_tokens == 4 for r in warm), warm
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    cached = []
    for turn in range(6):
        messages.append({"role": "user", "content": f"Turn {turn + 1}: {QUESTIONS[turn]}"})
        body = {"messages": list(messages), "temperature": 0, "max_completion_tokens": 16}
        on, off = chat(pair.on, body, stream=turn % 2 == 1), chat(pair.off, body, stream=turn % 2 == 1)
        assert on == off, (turn, on, off)
        assert off[0].cached == 0
        cached.append((on[0].cached, on[0].prompt_tokens, on[0].phones))
        messages.append(assistant_message(on[0], False))
    assert all(0 < c < p for c, p, _ in cached), cached
    # each next turn reuses at least the previous prompt up to its generation prompt, on the same phone
    assert all(cached[t][0] >= cached[t - 1][1] - GENERATION_PROMPT for t in range(1, 6)), cached
    assert len({phones for _, _, phones in cached}) == 1, cached
