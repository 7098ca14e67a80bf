"""The simulated decode loop: timing model, limits, the phone's state and checkpoints, fault knobs.

Shared by the one-shot CLI and session protocol v1.1 (server.sim.runtime / server.sim.session).
Time is deadline-based: the prompt is processed token by token (``prefill_factor`` decode steps per
token; a ``restore`` and each ``save`` add ``checkpoint_ms``), then token k is due at
``t0 + k * step`` whatever the time spent producing earlier ones, so the measured rate matches
``decode_tps`` instead of drifting below it. Every wait is on the request's cancel event, so
``cancel`` takes effect at once (well inside one token time).

What is generated is a function of the whole state at the start of decoding (start state + prompt,
:meth:`TextModel.continue_from`), never of how that state was reached (reset, continuation or
restore), so a host that reuses a wrong state gets different tokens.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Literal

from server.sim.generation import TextModel
from server.sim.physics import PhoneBody, Work
from server.sim.simconfig import SimConfig, SimConfigWatcher
from server.sim.state import BadCheckpoint, PhoneState, Save

logger = logging.getLogger(__name__)

Reason = Literal["stop", "length", "cancelled"]
CRASH_EXIT_CODE = 134  # what an abort() (SIGABRT) looks like to a shell
HANG_POLL_S = 0.05

__all__ = ["BadCheckpoint", "ContextOverflow", "Engine", "GenRequest", "GenResult", "Save"]


@dataclass(slots=True)
class GenRequest:
    """One generation, in the terms of the session protocol's ``generate`` op."""

    id: str | None
    prompt_ids: list[int]
    max_new: int
    temperature: float = 0.0
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)
    reset: bool = True
    restore: int | None = None  # v1.1: start from this slot (precedence over reset)
    save: list[Save] = field(default_factory=list)  # v1.1: checkpoints to take while prefilling
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(slots=True)
class GenResult:
    """What ``done`` reports."""

    reason: Reason
    prompt_tokens: int
    completion_tokens: int
    prefill_ms: float
    decode_ms: float
    saved: list[Save] = field(default_factory=list)  # checkpoints actually written, in order


class ContextOverflow(ValueError):
    """The prompt (plus the state it starts from) does not fit in the context."""


class Engine:
    """One loaded model: holds the phone's state and checkpoint slots between requests of a session."""

    def __init__(
        self,
        model: TextModel,
        watcher: SimConfigWatcher,
        *,
        precision: str,
        max_context: int,
        checkpoints: int = 0,
        shutdown: threading.Event | None = None,
        body: PhoneBody | None = None,
    ) -> None:
        self._model = model
        self._watcher = watcher
        self._precision = precision
        self.max_context = max_context
        self.shutdown = shutdown or threading.Event()  # set at session end: releases a hang
        self.phone = PhoneState(checkpoints)
        self._body = body  # temperature and battery (server/sim/physics.py); None: no physics

    @property
    def checkpoints(self) -> int:
        """Checkpoint slots of this process (0: a v1 runtime)."""
        return self.phone.checkpoints

    def state_tokens(self, req: GenRequest) -> int:
        """Tokens in the state ``req`` starts from (0 after reset, the slot's length after restore)."""
        return len(self.phone.start(reset=req.reset, restore=req.restore))

    def check(self, req: GenRequest) -> None:
        """Raise :class:`BadCheckpoint` or :class:`ContextOverflow` when ``req`` cannot be accepted."""
        held = self.state_tokens(req)
        self.phone.check_saves(req.save, held, len(req.prompt_ids))
        if held + len(req.prompt_ids) > self.max_context:
            raise ContextOverflow(
                f"prompt of {len(req.prompt_ids)} tokens + {held} in state exceeds the context of "
                f"{self.max_context}"
            )
        if held + len(req.prompt_ids) == 0:
            raise ContextOverflow("empty prompt and no state to continue from")

    def poison(self) -> None:
        """A request error: the live state becomes undefined (the slots are kept)."""
        self.phone.poison(self.phone.live)

    def run(
        self,
        req: GenRequest,
        emit: Callable[[int, float], None],
        garbage: Callable[[], None] = lambda: None,
    ) -> GenResult:
        """Prefill then decode; ``emit(id, t_ms)`` per generated token. Call :meth:`check` first.
        The request is work for the phone's body: it heats the phone, and decoding slows down as the
        phone throttles (server/sim/physics.py)."""
        with Work(self._body) as work:
            return self._run(req, emit, garbage, work)

    def _run(self, req: GenRequest, emit: Callable[[int, float], None], garbage: Callable[[], None],
             work: Work) -> GenResult:
        cfg = self._watcher.current()
        t_start = time.monotonic()
        saved: list[Save] = []
        if not self._prefill(req, cfg, t_start, saved):
            now = time.monotonic()
            return self._finish("cancelled", req, 0, t_start, now, now, saved)
        state = self.phone.live  # start state + prompt: what the output is a function of
        step = cfg.decode_step_s(self._precision)
        budget = min(req.max_new, self.max_context - len(state))
        t_dec = time.monotonic()
        prefill_end = t_dec
        t_dec += cfg.slow_first_token_s  # real seconds: meant for stall tests even at speed 0

        stream = self._model.continue_from(state, temperature=req.temperature, seed=req.seed,
                                           stop_ids=req.stop_ids, think=cfg.think, tool_call=cfg.tool_call,
                                           stop_rate=cfg.stop_rate, min_tokens=cfg.min_tokens, answer=cfg.answer)
        sent = 0
        reason: Reason = "length"
        while sent < budget:
            cfg = self._watcher.current()
            if cfg.crash_after is not None and sent >= cfg.crash_after:
                self._crash(req)
            t_dec += self._hang_while_set(cfg) + work.slowdown_s(step)
            if self._wait_until(t_dec + (sent + 1) * step, req):
                reason = "cancelled"
                self.phone.poison(state)
                break
            token = next(stream)
            if token in req.stop_ids:
                reason = "stop"  # the stop id is never fed: it is not in the state
                break
            if sent == 0 and cfg.garbage:
                garbage()
            emit(token, round(time.monotonic() * 1000.0, 3))
            state.append(token)
            sent += 1
        return self._finish(reason, req, sent, t_start, prefill_end, time.monotonic(), saved)

    def _prefill(self, req: GenRequest, cfg: SimConfig, t_start: float, saved: list[Save]) -> bool:
        """Restore or reset, then process the prompt token by token, saving on the way.

        Returns False when cancelled (the live state is then poisoned; slots written so far stay).
        """
        state = self.phone.start(reset=req.reset, restore=req.restore)
        held, prompt = len(state), req.prompt_ids
        self.phone.live = state
        token_s = cfg.decode_step_s(self._precision) * cfg.prefill_factor
        checkpoint_s = cfg.checkpoint_s()
        deadline = t_start + (checkpoint_s if req.restore is not None else 0.0)
        done = 0  # prompt tokens in the state
        for save in [*sorted(req.save, key=attrgetter("at")), None]:
            upto = len(prompt) if save is None else save.at - held
            segment_start = deadline
            deadline += (upto - done) * token_s
            if self._wait_until(deadline, req):
                elapsed = time.monotonic() - segment_start
                extra = upto - done if token_s <= 0 else min(upto - done, max(0, int(elapsed / token_s)))
                self.phone.poison(state + prompt[done : done + extra])
                return False
            state.extend(prompt[done:upto])
            done = upto
            if save is not None:
                self.phone.save(save.slot, state)
                saved.append(save)
                deadline += checkpoint_s
        return True

    def _finish(self, reason: Reason, req: GenRequest, sent: int, t0: float, t1: float, t2: float,
                saved: list[Save]) -> GenResult:
        return GenResult(reason, len(req.prompt_ids), sent, round((t1 - t0) * 1000, 3), round((t2 - t1) * 1000, 3),
                         saved)

    def _wait_until(self, deadline: float, req: GenRequest) -> bool:
        """Sleep until ``deadline``; True if the request was cancelled (checked even when late)."""
        delay = deadline - time.monotonic()
        if delay > 0:
            return req.cancel.wait(delay)
        return req.cancel.is_set()

    def _hang_while_set(self, cfg: SimConfig) -> float:
        """The ``hang`` fault: block (ignoring cancel) until cleared; returns the time lost."""
        if not cfg.hang:
            return 0.0
        t0 = time.monotonic()
        logger.debug("hang knob set: no more tokens until it is cleared")
        while self._watcher.current().hang and not self.shutdown.is_set():
            time.sleep(HANG_POLL_S)
        return time.monotonic() - t0

    def _crash(self, req: GenRequest) -> None:
        # Like a native abort(): no cleanup, no `done`; the host sees the stream end mid-request.
        sys.stderr.write(f"[qhx] fatal: HTP context lost during request {req.id} (crash_after knob)\n")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(CRASH_EXIT_CODE)

