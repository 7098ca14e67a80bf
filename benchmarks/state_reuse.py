"""Prompt-state reuse (issue 12): time to first token with ``--state-reuse on`` vs ``off``.

Three processes, as in production, started afresh for every scenario and mode (so that nothing a phone
holds carries over): simulated phones at their real rate (``qhx-server sim --phones N --speed 1``:
22.7 tok/s fp16, a prompt token costs 0.7 decode steps, ~30.8 ms; 4 checkpoint slots; no natural
stop, so every answer runs to ``max_tokens``), the server (``qhx-server serve --sim 0 --adb-server ...
--state-reuse on|off``) and this client (``openai.AsyncOpenAI``, streaming ``/v1/chat/completions``
at temperature 0 with ``return_timings``).

TTFT = client: request sent -> first chunk carrying generated text. Each request's usage gives
``prompt_tokens`` and ``prompt_tokens_details.cached_tokens``; its timings the server's queue wait
and the phone's prefill time (where the time goes).

(a) One phone, one chat: a ~60-token system prompt, six turns of ~30-token questions, 20-token
    answers. TTFT per turn, on and off; turn 6 off / on (target >= 5x); each turn's TTFT against what
    the phone needs for the tokens it has not processed before: (prompt - cached) x 30.8 ms + 50 ms
    (one decode step, 44 ms, and the host; target: within 1.2x).
(b) Two phones, a ~300-token shared system prompt with tools, 20 single-turn requests from different
    users (two clients at a time, one per phone; the phones answer in text: sim knob ``tool_call``
    false): median TTFT off / on (target >= 4x).
(c) Four phones, 16 concurrent six-turn conversations (the system prompt of (a), each user with their
    own questions, no think time): share of turns 2-6 that reuse state (cached_tokens > 0, target
    >= 80 %), median TTFT off / on (target >= 3x), errors (target 0).

    .venv/bin/python benchmarks/state_reuse.py [--only a,b,c] [--turns 6] [--b-requests 20]
        [--c-conversations 16] [--answer-tokens 20] [--serve-args '--history-render as-generated']
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from stack import Stack, machine_info

from server.sim.simconfig import DECODE_TPS, DEFAULTS

PROMPT_MS = float(DEFAULTS["prefill_factor"]) / DECODE_TPS["fp16"] * 1000  # a prompt token on the phone
SLACK_MS = 50.0  # the first decode step (44 ms) and the host

SYSTEM = ("You are Ada, the assistant of a small bakery in Lyon. Answer questions about bread, pastries, "
          "opening hours, allergens and orders politely and in at most two sentences. Never invent prices; "
          "if you do not know, say so and suggest calling the shop.")
QUESTIONS = [  # ~30 tokens each
    ("Hello! I would like to order two sourdough loaves and a dozen croissants for Saturday morning. "
     "Is that possible, and when should I come?"),
    ("Great, thanks. Do any of your croissants contain nuts or sesame? My daughter has a serious "
     "allergy, so I need to be careful."),
    ("Understood. Could you also bake a small lemon tart for four people, ideally without too much "
     "sugar? It is for my grandmother."),
    ("Perfect. What time do you close on Saturdays, and is there somewhere to park a car near the "
     "shop in the morning?"),
    ("One more thing: can I pay by card when I pick everything up, or do you need a deposit in "
     "advance for a tart?"),
    ("Thank you so much for your help. Could you summarise my whole order in one sentence so I can "
     "write it down?"),
]
# the system/tools block: ~310 tokens (the template's tool instructions are most of it)
AGENT_SYSTEM = ("You are the support agent of Lumen Mobile, a phone operator. Be brief and precise, and use "
                "the tool instead of guessing.")
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "check_outage", "description": "Known network outages near a postcode, with the expected end",
        "parameters": {"type": "object", "properties": {
            "postcode": {"type": "string"},
            "service": {"type": "string", "enum": ["mobile", "fibre", "sms"]}},
            "required": ["postcode"]}}},
]
USERS = [
    "My phone has had no signal since this morning in 69003, is there an outage?",
    "I want to switch to a plan with more data, my number is +33612345678.",
    "Can you tell me which plans include roaming in Spain? I travel next week.",
    "My bill looks too high this month, can you check my account please?",
    "Is fibre down in 75011? My internet stopped an hour ago.",
]


@dataclass
class Turn:
    """One streamed chat request as the client saw it."""

    ttft_ms: float = float("nan")  # nan until the first generated text arrives
    prompt_tokens: int = 0
    cached: int = 0
    completion_tokens: int = 0
    text: str = ""
    queue_ms: float = float("nan")  # server: request -> the phone's start
    prefill_ms: float = float("nan")  # phone: prompt processing (restore and saves included)
    phone: str = ""
    error: str | None = None

    @property
    def new_tokens(self) -> int:
        return self.prompt_tokens - self.cached

    @property
    def need_ms(self) -> float:
        """What the phone needs for the tokens it has not processed before, plus the first step."""
        return self.new_tokens * PROMPT_MS + SLACK_MS


@dataclass
class Conversation:
    system: str
    questions: list[str]
    answer_tokens: int
    tools: list[dict[str, Any]] | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)


async def ask(client: openai.AsyncOpenAI, model: str, messages: list[dict[str, Any]], max_tokens: int,
              tools: list[dict[str, Any]] | None = None) -> Turn:
    turn = Turn()
    extra: dict[str, Any] = {"tools": tools} if tools else {}
    t0 = time.monotonic()
    try:
        stream = await client.chat.completions.create(  # type: ignore[call-overload]
            model=model, messages=messages,
            max_completion_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_timings": True}, **extra)
        async for chunk in stream:
            for c in chunk.choices:
                piece = (c.delta.content or "") + ((c.delta.model_extra or {}).get("reasoning_content") or "")
                if (piece or c.delta.tool_calls) and math.isnan(turn.ttft_ms):
                    turn.ttft_ms = (time.monotonic() - t0) * 1000
                turn.text += piece
            timings = (chunk.model_extra or {}).get("timings")
            if timings:
                turn.queue_ms, turn.prefill_ms = float(timings["queue_ms"]), float(timings["prefill_ms"])
                turn.phone = str(timings["phone"])
            if chunk.usage is not None:
                turn.prompt_tokens = chunk.usage.prompt_tokens
                turn.completion_tokens = chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                turn.cached = (details.cached_tokens or 0) if details is not None else 0
    except openai.APIError as e:
        turn.error = f"{type(e).__name__}: {e}"
    return turn


async def converse(client: openai.AsyncOpenAI, model: str, conv: Conversation) -> None:
    conv.messages = [{"role": "system", "content": conv.system}]
    for question in conv.questions:
        conv.messages.append({"role": "user", "content": question})
        turn = await ask(client, model, conv.messages, conv.answer_tokens, conv.tools)
        conv.turns.append(turn)
        if turn.error:
            return
        conv.messages.append({"role": "assistant", "content": turn.text})


SERVE_ARGS: list[str] = []  # --serve-args: more `qhx-server serve` options, for both modes
SIM_ARGS: list[str] = []  # --checkpoints N: `qhx-server sim --checkpoints N`


def run_stack(workdir: Path, phones: int, reuse: str, body: Callable[[Stack], Any], **knobs: Any) -> Any:
    folder = workdir / f"{reuse}-{time.monotonic_ns()}"
    with Stack(folder, phones, serve_args=["--state-reuse", reuse, *SERVE_ARGS], sim_args=SIM_ARGS) as stack:
        if knobs:
            stack.knobs(**knobs)
        return body(stack)


def client_for(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=900)


def med(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- (a)


def scenario_a(workdir: Path, args: argparse.Namespace) -> bool:
    questions = QUESTIONS[: args.turns]
    runs: dict[str, Conversation] = {}
    for reuse in ("off", "on"):
        def body(stack: Stack) -> Conversation:
            conv = Conversation(SYSTEM, questions, args.answer_tokens)

            async def go() -> None:
                async with client_for(stack) as client:
                    await converse(client, stack.model, conv)

            asyncio.run(go())
            return conv

        runs[reuse] = run_stack(workdir, 1, reuse, body)
    off, on = runs["off"].turns, runs["on"].turns
    print(f"\n(a) one phone, a {len(on)}-turn chat: system prompt ~60 tokens, questions ~30, answers "
          f"{args.answer_tokens} tokens")
    print("turn | prompt | off: TTFT ms  TTFT/need | on: cached  TTFT ms  need ms  TTFT/need  queue  prefill "
          "| off/on")
    for i, (f, n) in enumerate(zip(off, on, strict=True), 1):
        print(f"{i:4} | {n.prompt_tokens:6} | {f.ttft_ms:12.0f} {f.ttft_ms / f.need_ms:10.2f} | "
              f"{n.cached:10} {n.ttft_ms:8.0f} {n.need_ms:8.0f} {n.ttft_ms / n.need_ms:10.2f} {n.queue_ms:6.0f} "
              f"{n.prefill_ms:8.0f} | {f.ttft_ms / n.ttft_ms:6.1f}x")
    worst = max(t.ttft_ms / t.need_ms for t in on)
    worst_off = max(t.ttft_ms / t.need_ms for t in off)
    last = off[-1].ttft_ms / on[-1].ttft_ms
    same = [f.text == n.text for f, n in zip(off, on, strict=True)]
    errors = [t.error for t in off + on if t.error]
    print(f"turn {len(on)}: off/on = {last:.1f}x (target >= 5x); worst TTFT/need with reuse {worst:.2f} "
          f"(target <= 1.2; without: {worst_off:.2f}); replies identical on/off: {sum(same)}/{len(same)}; "
          f"errors: {errors or 0}")
    return last >= 5 and worst <= 1.2 and all(same) and not errors


# --------------------------------------------------------------------------- (b)


def scenario_b(workdir: Path, args: argparse.Namespace) -> bool:
    results: dict[str, list[Turn]] = {}
    for reuse in ("off", "on"):
        def body(stack: Stack) -> list[Turn]:
            pending = [f"(user {i + 1}) {USERS[i % len(USERS)]}" for i in range(args.b_requests)]
            done: list[Turn] = []

            async def worker(client: openai.AsyncOpenAI) -> None:
                while pending:
                    user = pending.pop(0)
                    msgs = [{"role": "system", "content": AGENT_SYSTEM}, {"role": "user", "content": user}]
                    done.append(await ask(client, stack.model, msgs, args.b_answer_tokens, TOOLS))

            async def go() -> None:
                async with client_for(stack) as client:
                    await asyncio.gather(*(worker(client) for _ in range(2)))

            asyncio.run(go())
            return done

        results[reuse] = run_stack(workdir, 2, reuse, body, tool_call=False)
    off, on = results["off"], results["on"]
    ratio = med([t.ttft_ms for t in off]) / med([t.ttft_ms for t in on])
    errors = [t.error for t in off + on if t.error]
    print(f"\n(b) two phones, {args.b_requests} single-turn requests (two at a time) with a shared system "
          f"prompt and tools")
    for name, turns in (("off", off), ("on", on)):
        ttft = [t.ttft_ms for t in turns]
        print(f"  {name}: TTFT median {med(ttft):.0f} ms (min {min(ttft):.0f}, max {max(ttft):.0f}); prompt "
              f"tokens median {med([t.prompt_tokens for t in turns]):.0f}, cached median "
              f"{med([t.cached for t in turns]):.0f}; queue median {med([t.queue_ms for t in turns]):.0f} ms, "
              f"prefill median {med([t.prefill_ms for t in turns]):.0f} ms; phones used "
              f"{len({t.phone for t in turns})}")
    print(f"  median TTFT off/on = {ratio:.1f}x (target >= 4x); errors: {errors or 0}")
    return ratio >= 4 and not errors


# --------------------------------------------------------------------------- (c)


def scenario_c(workdir: Path, args: argparse.Namespace) -> bool:
    results: dict[str, list[Conversation]] = {}
    questions = QUESTIONS[: args.turns]
    for reuse in ("off", "on"):
        def body(stack: Stack) -> list[Conversation]:
            convs = [Conversation(SYSTEM, [f"(customer {k + 1}) {q}" for q in questions], args.answer_tokens)
                     for k in range(args.c_conversations)]

            async def go() -> None:
                async with client_for(stack) as client:
                    await asyncio.gather(*(converse(client, stack.model, c) for c in convs))

            asyncio.run(go())
            return convs

        results[reuse] = run_stack(workdir, 4, reuse, body)
    if args.dump:
        args.dump.write_text(json.dumps({name: [[dataclasses.asdict(t) for t in c.turns] for c in convs]
                                         for name, convs in results.items()}, indent=1))
    print(f"\n(c) four phones, {args.c_conversations} concurrent {len(questions)}-turn conversations")
    ok = True
    summary: dict[str, float] = {}
    for name in ("off", "on"):
        turns = [t for c in results[name] for t in c.turns]
        later = [t for c in results[name] for t in c.turns[1:]]
        errors = [t.error for t in turns if t.error]
        hit = sum(1 for t in later if t.cached > 0 and not t.error) / max(1, len(later))
        # the system block (what a first turn reuses at most): turns reusing more reuse their own history
        block = max([c.turns[0].cached for c in results[name] if c.turns], default=0)
        own = sum(1 for t in later if t.cached > block) / max(1, len(later))
        stay = sum(1 for c in results[name] for i in range(1, len(c.turns))
                   if c.turns[i].phone == c.turns[i - 1].phone)
        summary[name] = med([t.ttft_ms for t in turns])
        print(f"  {name}: {len(turns)} requests, errors {len(errors)}; TTFT median {summary[name]:.0f} ms "
              f"(turn 1: {med([c.turns[0].ttft_ms for c in results[name] if c.turns]):.0f}, turns 2+: "
              f"{med([t.ttft_ms for t in later]):.0f}); turns 2+ with cached > 0: {100 * hit:.0f} %, reusing "
              f"more than the system block ({block} tokens): {100 * own:.0f} %, on the phone of the turn "
              f"before: {100 * stay / max(1, len(later)):.0f} %; "
              f"cached/prompt tokens {sum(t.cached for t in turns)}/{sum(t.prompt_tokens for t in turns)}; "
              f"queue median {med([t.queue_ms for t in turns]):.0f} ms, prefill median "
              f"{med([t.prefill_ms for t in turns]):.0f} ms")
        if errors:
            print(f"    first errors: {errors[:3]}")
        ok = ok and not errors
        if name == "on":
            ok = ok and hit >= 0.8
            summary["hit"] = hit
    ratio = summary["off"] / summary["on"]
    print(f"  median TTFT off/on = {ratio:.1f}x (target >= 3x); turns 2+ reusing: "
          f"{100 * summary['hit']:.0f} % (target >= 80 %)")
    return ok and ratio >= 3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="a,b,c", help="scenarios to run, e.g. a or a,c")
    ap.add_argument("--turns", type=int, default=6, help="turns of the chats of (a) and (c), at most 6")
    ap.add_argument("--answer-tokens", type=int, default=20, help="tokens of each answer in (a) and (c)")
    ap.add_argument("--b-requests", type=int, default=20)
    ap.add_argument("--b-answer-tokens", type=int, default=16)
    ap.add_argument("--c-conversations", type=int, default=16)
    ap.add_argument("--checkpoints", type=int, help="checkpoint slots per phone (default: the simulator's 4)")
    ap.add_argument("--serve-args", default="", help="more serve options for both modes, e.g. "
                    "'--history-render as-generated'")
    ap.add_argument("--dump", type=Path, help="write every turn of (c) (phone, cached, timings) to this JSON file")
    args = ap.parse_args()
    SERVE_ARGS.extend(args.serve_args.split())
    if args.checkpoints is not None:
        SIM_ARGS.extend(["--checkpoints", str(args.checkpoints)])
    args.turns = max(2, min(args.turns, len(QUESTIONS)))
    print(f"machine: {machine_info()}; load average {os.getloadavg()[0]:.1f}; serve options: "
          f"--state-reuse on|off {args.serve_args}".rstrip() + f"; sim options: {' '.join(SIM_ARGS) or '-'}")
    print(f"phone: {PROMPT_MS:.1f} ms per prompt token, {1000 / DECODE_TPS['fp16']:.1f} ms per generated "
          f"token (speed 1, fp16)")
    scenarios = {"a": scenario_a, "b": scenario_b, "c": scenario_c}
    results = {}
    with tempfile.TemporaryDirectory(prefix="qhx-bench-reuse-") as tmp:
        for key in args.only.split(","):
            t0 = time.monotonic()
            results[key] = scenarios[key.strip()](Path(tmp), args)
            print(f"  [{key}: {time.monotonic() - t0:.0f} s, load average {os.getloadavg()[0]:.1f}]")
    print("\n" + " ".join(f"({k}) {'PASS' if v else 'FAIL'}" for k, v in results.items()))
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
