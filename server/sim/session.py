"""Session protocol v1.1 (device-protocol.md section 3), phone side.

Threads: the main thread reads stdin and answers ``ping``/``cancel``/``busy``/``bad_request`` at
once; one worker thread runs generations, so a ``ping`` is answered while tokens are flowing.
Every event is written as one JSON line under a lock and flushed, so lines never interleave.

Details the contract leaves open, as implemented here:

* ``max_new`` of a request is capped by the ``max_new`` of the command line.
* state after a request (what ``reset: false`` continues from) = its start state + prompt + the
  ids sent as ``tok``; the stop id is not part of it (it was sampled, never decoded). After a
  cancel, or an error while idle (``bad_request``, ``context_overflow``), the state is undefined and
  poisoned (server.sim.state). ``busy`` and errors that arrive while a request runs concern other
  lines: the running request's ``done`` still defines the state.
* ``completion_tokens`` counts the ids sent as ``tok`` (the stop id excluded).
* v1.1 checkpoints when the process has slots (``checkpoints`` knob > 0): ``ready`` says how many,
  ``restore``/``save`` are read, ``start`` has ``restored`` and ``done`` has ``saved``. With 0 slots
  the process is a v1 runtime: those fields are unknown, hence ignored, and never sent.
* malformed lines get ``bad_request`` with ``id: null`` when no id can be read; the session stays
  alive (only ``code: runtime`` errors are fatal here). Blank lines are ignored.
* stdin EOF cancels the running request (its ``done`` is still written), then the process exits 0.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import threading
from collections.abc import Mapping
from typing import Any, BinaryIO

from server.sim.engine import BadCheckpoint, ContextOverflow, Engine, GenRequest
from server.sim.state import MAX_SAVES, Save

GARBAGE_LINE = b"QnnDsp <W> fastrpc: unexpected log flush \x1b[0m ##%%@@ (not json\n"


class BadRequest(ValueError):
    """A host line that is not a valid request."""


class Output:
    """Writes protocol lines atomically (one write + flush under a lock)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, event: Mapping[str, Any]) -> None:
        """Write one event as a JSON line."""
        self.raw((json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n").encode())

    def raw(self, line: bytes) -> None:
        """Write bytes as they are (the ``garbage`` fault)."""
        with self._lock:
            try:
                self._stream.write(line)
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                os._exit(1)  # the host is gone: nobody left to talk to


class Session:
    """Serves requests from stdin until EOF; returns the exit code."""

    def __init__(self, engine: Engine, out: Output, *, max_new_cap: int, vocab_size: int) -> None:
        self._engine = engine
        self._out = out
        self._max_new_cap = max_new_cap
        self._vocab_size = vocab_size
        self._lock = threading.Lock()
        self._current: GenRequest | None = None
        self._queue: queue.Queue[GenRequest | None] = queue.Queue()
        self._shutdown = threading.Event()
        engine.shutdown = self._shutdown

    def serve(self, stdin: BinaryIO) -> int:
        """Read requests line by line; on EOF cancel the running request and exit 0."""
        worker = threading.Thread(target=self._work, name="generate", daemon=True)
        worker.start()
        for raw in stdin:
            if raw.strip():
                self._handle(raw)
        with self._lock:
            if self._current is not None:
                self._current.cancel.set()
        self._shutdown.set()
        self._queue.put(None)
        worker.join()
        return 0

    def _handle(self, raw: bytes) -> None:
        msg_id = None
        try:
            try:
                msg = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise BadRequest(f"not a JSON line: {exc}") from None
            if not isinstance(msg, dict):
                raise BadRequest("a request must be a JSON object")
            msg_id = msg.get("id") if isinstance(msg.get("id"), str) else None
            op = msg.get("op")
            if op == "ping":
                self._out.send({"ev": "pong", "id": msg.get("id")})
            elif op == "cancel":
                self._cancel(_require_id(msg))
            elif op == "generate":
                self._submit(self._parse_generate(msg))
            else:
                raise BadRequest(f"unknown op {op!r}")
        except BadRequest as exc:
            self._poison_if_idle()
            self._error(msg_id, "bad_request", str(exc))

    def _poison_if_idle(self) -> None:
        # An error while idle leaves the state undefined; while a request runs, its `done` decides.
        with self._lock:
            if self._current is None:
                self._engine.poison()

    def _cancel(self, request_id: str) -> None:
        # A cancel for a request that already finished (or never existed) is a harmless race.
        with self._lock:
            if self._current is not None and self._current.id == request_id:
                self._current.cancel.set()

    def _submit(self, req: GenRequest) -> None:
        with self._lock:
            if self._current is not None:
                busy = self._current.id
            else:
                busy = None
                self._current = req
        if busy is not None:
            self._error(req.id, "busy", f"request {busy} is still generating")
        else:
            self._queue.put(req)

    def _work(self) -> None:
        while (req := self._queue.get()) is not None:
            try:
                self._engine.check(req)
            except (BadCheckpoint, ContextOverflow) as exc:
                self._engine.poison()
                self._idle()
                code = "bad_request" if isinstance(exc, BadCheckpoint) else "context_overflow"
                self._error(req.id, code, str(exc))
                continue
            start: dict[str, Any] = {"ev": "start", "id": req.id, "prompt_tokens": len(req.prompt_ids),
                                     "state_tokens": self._engine.state_tokens(req)}
            if self._engine.checkpoints:
                start["restored"] = req.restore
            self._out.send(start)
            result = self._engine.run(req, functools.partial(self._send_tok, req.id),
                                      garbage=lambda: self._out.raw(GARBAGE_LINE))
            # Idle *before* `done` is written: a host that sends the next generate as soon as it
            # reads `done` must never be told `busy`.
            self._idle()
            done: dict[str, Any] = {
                "ev": "done", "id": req.id, "reason": result.reason, "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens, "prefill_ms": result.prefill_ms,
                "decode_ms": result.decode_ms}
            if self._engine.checkpoints:
                done["saved"] = [{"slot": s.slot, "tokens": s.at} for s in result.saved]
            self._out.send(done)

    def _send_tok(self, request_id: str | None, token: int, t_ms: float) -> None:
        self._out.send({"ev": "tok", "id": request_id, "ids": [token], "t_ms": t_ms})

    def _idle(self) -> None:
        with self._lock:
            self._current = None

    def _error(self, request_id: str | None, code: str, message: str) -> None:
        self._out.send({"ev": "error", "id": request_id, "code": code, "message": message})

    def _parse_generate(self, msg: Mapping[str, Any]) -> GenRequest:
        request_id = _require_id(msg)
        prompt_ids = msg.get("prompt_ids")
        if not isinstance(prompt_ids, list) or not all(_is_int(i) for i in prompt_ids):
            raise BadRequest("prompt_ids must be a list of integers")
        if any(not 0 <= i < self._vocab_size for i in prompt_ids):
            raise BadRequest(f"prompt_ids must be in [0, {self._vocab_size})")
        max_new = msg.get("max_new")
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 0:
            raise BadRequest("max_new must be an integer >= 0")
        temperature = _number(msg, "temperature", 0.0, minimum=0.0)
        _number(msg, "top_p", 1.0, minimum=0.0)
        _number(msg, "repetition_penalty", 1.0, minimum=0.0)
        top_k = msg.get("top_k", 0)
        if not _is_int(top_k) or top_k < 0:
            raise BadRequest("top_k must be an integer >= 0")
        seed = msg.get("seed")
        if seed is not None and not _is_int(seed):
            raise BadRequest("seed must be an integer or null")
        stop_ids = msg.get("stop_ids", [])
        if not isinstance(stop_ids, list) or not all(_is_int(i) for i in stop_ids):
            raise BadRequest("stop_ids must be a list of integers")
        reset = msg.get("reset", True)
        if not isinstance(reset, bool):
            raise BadRequest("reset must be a boolean")
        req = GenRequest(id=request_id, prompt_ids=prompt_ids, max_new=min(max_new, self._max_new_cap),
                         temperature=temperature, seed=seed, stop_ids=stop_ids, reset=reset)
        if self._engine.checkpoints:  # a v1 runtime (no slots) ignores these as unknown fields
            req.restore, req.save = _parse_checkpoints(msg)
        return req


def _parse_checkpoints(msg: Mapping[str, Any]) -> tuple[int | None, list[Save]]:
    """``restore`` (a slot or null) and ``save`` (at most 2 ``{"slot", "at"}``); ranges are the engine's."""
    restore = msg.get("restore")
    if restore is not None and not _is_int(restore):
        raise BadRequest("restore must be a slot number or null")
    raw = msg.get("save")
    if raw is None:
        return restore, []
    if not isinstance(raw, list):
        raise BadRequest('save must be a list of {"slot": S, "at": P}')
    if len(raw) > MAX_SAVES:
        raise BadRequest(f"save: at most {MAX_SAVES} per request, got {len(raw)}")
    saves = []
    for item in raw:
        if not isinstance(item, dict) or not _is_int(item.get("slot")) or not _is_int(item.get("at")):
            raise BadRequest('save must be a list of {"slot": S, "at": P} with integer S and P')
        saves.append(Save(slot=item["slot"], at=item["at"]))
    return restore, saves


def _require_id(msg: Mapping[str, Any]) -> str:
    request_id = msg.get("id")
    if not isinstance(request_id, str):
        raise BadRequest("id must be a string")
    return request_id


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(msg: Mapping[str, Any], key: str, default: float, *, minimum: float) -> float:
    value = msg.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise BadRequest(f"{key} must be a number >= {minimum}")
    return float(value)
