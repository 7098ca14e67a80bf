"""The simulated decode loop: timing model, limits, conversation state and fault knobs.

Shared by the one-shot CLI and session protocol v1 (server.sim.runtime / server.sim.session).
Time is deadline-based: after prefill, token k is due at ``t0 + k * step`` whatever the time spent
producing earlier ones, so the measured rate matches ``decode_tps`` instead of drifting below it.
Every wait is on the request's cancel event, so ``cancel`` takes effect at once (well inside one
token time).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from server.sim.generation import TextModel, request_rng, steer
from server.sim.simconfig import SimConfig, SimConfigWatcher

logger = logging.getLogger(__name__)

Reason = Literal["stop", "length", "cancelled"]
CRASH_EXIT_CODE = 134  # what an abort() (SIGABRT) looks like to a shell
HANG_POLL_S = 0.05


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
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(slots=True)
class GenResult:
    """What ``done`` reports."""

    reason: Reason
    prompt_tokens: int
    completion_tokens: int
    prefill_ms: float
    decode_ms: float


class ContextOverflow(ValueError):
    """The prompt (plus the state kept by ``reset: false``) does not fit in the context."""


class Engine:
    """One loaded model: holds the conversation state between requests of a session."""

    def __init__(
        self,
        model: TextModel,
        watcher: SimConfigWatcher,
        *,
        precision: str,
        max_context: int,
        shutdown: threading.Event | None = None,
    ) -> None:
        self._model = model
        self._watcher = watcher
        self._precision = precision
        self.max_context = max_context
        self.shutdown = shutdown or threading.Event()  # set at session end: releases a hang
        self.state: list[int] = []  # tokens held in conv/SSM/KV state

    def state_tokens(self, req: GenRequest) -> int:
        """Tokens held in state before ``req``'s prompt (0 when it resets)."""
        return 0 if req.reset else len(self.state)

    def check(self, req: GenRequest) -> None:
        """Raise :class:`ContextOverflow` when the prompt cannot be accepted."""
        held = self.state_tokens(req)
        if held + len(req.prompt_ids) > self.max_context:
            raise ContextOverflow(
                f"prompt of {len(req.prompt_ids)} tokens + {held} in state exceeds the context of "
                f"{self.max_context}"
            )
        if held + len(req.prompt_ids) == 0:
            raise ContextOverflow("empty prompt and no state to continue from")

    def run(
        self,
        req: GenRequest,
        emit: Callable[[int, float], None],
        garbage: Callable[[], None] = lambda: None,
    ) -> GenResult:
        """Prefill then decode; ``emit(id, t_ms)`` per generated token. Call :meth:`check` first."""
        cfg = self._watcher.current()
        context = ([] if req.reset else list(self.state)) + list(req.prompt_ids)
        self.state = context  # from here on the state holds the prompt (cancel keeps it too)
        step = cfg.decode_step_s(self._precision)
        budget = min(req.max_new, self.max_context - len(context))

        t_start = time.monotonic()
        if self._wait_until(t_start + len(req.prompt_ids) * step * cfg.prefill_factor, req):
            return self._finish("cancelled", req, 0, t_start, time.monotonic(), time.monotonic())
        t_dec = time.monotonic()
        prefill_end = t_dec
        t_dec += cfg.slow_first_token_s  # real seconds: meant for stall tests even at speed 0

        steering = steer(self._model.decode(context), think=cfg.think, tool_call=cfg.tool_call)
        rng = request_rng(context, req.temperature, req.seed)
        stream = self._model.stream(steering, rng, req.stop_ids, stop_rate=cfg.stop_rate,
                                    min_tokens=cfg.min_tokens)
        sent = 0
        reason: Reason = "length"
        while sent < budget:
            cfg = self._watcher.current()
            if cfg.crash_after is not None and sent >= cfg.crash_after:
                self._crash(req)
            t_dec += self._hang_while_set(cfg)
            if self._wait_until(t_dec + (sent + 1) * step, req):
                reason = "cancelled"
                break
            token = next(stream)
            if token in req.stop_ids:
                reason = "stop"
                break
            if sent == 0 and cfg.garbage:
                garbage()
            emit(token, round(time.monotonic() * 1000.0, 3))
            self.state.append(token)
            sent += 1
        return self._finish(reason, req, sent, t_start, prefill_end, time.monotonic())

    def _finish(self, reason: Reason, req: GenRequest, sent: int, t0: float, t1: float, t2: float) -> GenResult:
        return GenResult(reason, len(req.prompt_ids), sent, round((t1 - t0) * 1000, 3), round((t2 - t1) * 1000, 3))

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

