"""One long-lived ``qhx_generate`` process on a phone, speaking session protocol v1 (device-protocol.md 3).

A :class:`~server.backends.adb.runtime.Runtime`. A background reader task owns the stream: it splits
stdout into JSON lines and routes each event to the request it belongs to (an inbox), logs stderr lines
with the phone's serial, and notices the end of the process or of the adb stream. ``generate()`` turns
the inbox into contract events and enforces order::

    start -> tok* -> done          (or error with our id, at any point)

Failure handling, in one place:
  * stream ends / process exits      -> PhoneLost (the session is dead; the owner restarts it)
  * token gap > stall timeout        -> PhoneStalled, and the session is aborted (restart)
  * events out of order / malformed  -> ProtocolViolation, session aborted (the phone's state is unknown)
  * ``error`` with our id            -> PhoneRequestError / PhoneBusy / ContextLengthExceeded; session lives
  * consumer leaves early            -> ``cancel`` sent, wait (bounded) for ``done``; if it never
                                        comes, the session is aborted

State reuse (docs/state-reuse.md): the session keeps a :class:`~server.backends.adb.reuse.Tracker` of
what its process holds (the live state's ids, each checkpoint slot's; ``ready.checkpoints`` slots, none
for a v1 runtime) and sends each request from the start point it plans: ``reset: false`` or
``restore`` with only the rest of the prompt, ``save`` at the request's boundaries. What the caller
sees is the whole prompt (``Started.prompt_tokens``) and what was not processed again
(``Started.cached_tokens``). The phone's ``start.state_tokens`` must be what the tracker expects; on a
mismatch (or a reuse the phone refuses: ``bad_request``, ``context_overflow``) the session logs it,
treats the phone as holding nothing, stops that attempt and runs the request again from a reset
before any token reached the caller, so the reply is what it would have been without reuse. A
process that ends (restart) takes its tracker with it: a new session holds nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.backends.adb.reuse import RESET, Holding, Plan, TokenBytes, Tracker
from server.backends.adb.runtime import Runtime
from server.backends.adb.transport import (
    STDERR,
    STDOUT,
    AdbServerClient,
    LineBuffer,
    ShellStream,
    open_shell,
)
from server.backends.base import Event, Finished, GenerationParams, Started, Tokens
from server.errors import (
    BackendError,
    ContextLengthExceeded,
    PhoneBusy,
    PhoneLost,
    PhoneRequestError,
    PhoneStalled,
    ProtocolViolation,
)
from server.settings import Settings

logger = logging.getLogger(__name__)
stderr_log = logging.getLogger("server.backends.adb.stderr")

PROTO = 1
FINISH_REASONS = ("stop", "length", "cancelled")
RERUN_CODES = ("bad_request", "context_overflow")  # refusals of a reuse plan that a reset may not get


class SessionUnsupported(Exception):
    """The runtime did not answer with a ``ready`` event: it does not speak session protocol v1."""


@dataclass(eq=False)
class _Closed:
    reason: str


class _Rerun(Exception):
    """The phone does not hold what the tracker thought (or refused the plan): run the request again
    from a reset. ``running``: the phone is still on the first attempt (it must be cancelled first)."""

    def __init__(self, why: str, *, running: bool) -> None:
        super().__init__(why)
        self.why = why
        self.running = running


RESET_PLAN = Plan(RESET, [])


@dataclass(eq=False)
class _Request:
    id: str
    inbox: deque[dict[str, Any] | _Closed] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    last_at: float = 0.0  # loop time of the last event (the stall clock)
    timeout: float = 0.0  # the stall timeout that applies to the next event
    started: bool = False
    over: bool = False  # the request ended (done, an error event, or given up after a cancel)
    completion: int = 0
    cancel_deadline: float | None = None
    plan: Plan = RESET_PLAN
    generated: list[int] = field(default_factory=list)  # ids sent as `tok` (the live state's tail)
    cancel_wanted: bool = False  # the consumer asked for a cancel (kept across a rerun)
    rerun: bool = False  # this is the request's second attempt, from a reset


def request_message(params: GenerationParams, plan: Plan | None = None) -> dict[str, Any]:
    """The ``generate`` op for params (device-protocol.md, host -> phone), sent from ``plan``'s start
    point (default: the whole prompt as ``params`` says): only the ids after it, ``restore`` and
    ``save`` when the plan has them (v1.1; never for a runtime without checkpoints)."""
    msg: dict[str, Any] = {
        "op": "generate",
        "id": params.request_id,
        "prompt_ids": params.prompt_ids if plan is None else plan.send,
        "max_new": params.max_new,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "repetition_penalty": params.repetition_penalty,
        "seed": params.seed,
        "stop_ids": params.stop_ids,
        "reset": params.reset if plan is None else plan.start.reset,
    }
    if plan is not None and plan.start.restore is not None:
        msg["restore"] = plan.start.restore
    if plan is not None and plan.saves:
        msg["save"] = [{"slot": save.slot, "at": save.at} for save in plan.saves]
    return msg


def request_error(ev: dict[str, Any], serial: str) -> BackendError | ContextLengthExceeded:
    code = ev.get("code")
    message = f"{serial}: {ev.get('message') or code}"
    if code == "context_overflow":
        return ContextLengthExceeded(f"prompt plus max_tokens exceed the model's context ({message})")
    if code == "busy":
        return PhoneBusy(message)
    return PhoneRequestError(f"phone rejected the request ({code}): {message}")


class Session(Runtime):
    """A started session; build it with ``await Session.start(...)``.

    It keeps only what routes protocol events: the request its events belong to (``_request``).
    Whether the phone is busy is the Phone's to say (server/backends/adb/phone.py)."""

    kind = "session"

    def __init__(self, stream: ShellStream, serial: str, settings: Settings) -> None:
        self.serial = serial
        self.ready: dict[str, Any] = {}
        self.closed_reason: str | None = None
        self._cleanup: asyncio.Task[None] | None = None
        self._stream = stream
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        self._out = bytearray()
        self._err = LineBuffer()
        self._stderr_tail: deque[str] = deque(maxlen=8)
        self._fatal: str | None = None
        self._saw_text = False
        self._ready_fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._closed = asyncio.Event()
        self._request: _Request | None = None
        self._pings: dict[str, asyncio.Future[float]] = {}
        self._ping_seq = 0
        self._reader: asyncio.Task[None] | None = None
        self.tracker = Tracker(0, enabled=settings.state_reuse == "on")  # what the process holds

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def start(
        cls,
        client: AdbServerClient,
        serial: str,
        command: str,
        settings: Settings,
    ) -> Session:
        """Launch the runtime and wait for ``ready``. Raises SessionUnsupported or PhoneLost."""
        stream = await open_shell(client, serial, command)
        self = cls(stream, serial, settings)
        self._reader = asyncio.create_task(self._read_loop(), name=f"qhx-session-reader-{serial}")
        try:
            async with asyncio.timeout(settings.ready_timeout_s):
                self.ready = await asyncio.shield(self._ready_fut)
        except TimeoutError:
            self.abort(f"no `ready` within {settings.ready_timeout_s:g} s")
            raise PhoneLost(
                f"{serial}: session start: no `ready` within {settings.ready_timeout_s:g} s"
            ) from None
        except BaseException as e:
            # the caller reports why (and a fallback to one-shot is no warning matter)
            self.abort(f"session start failed: {e!r}", quiet=True)
            raise
        slots = self.ready.get("checkpoints")
        slots = slots if type(slots) is int and slots > 0 else 0  # absent or 0: a v1 runtime
        self.tracker = Tracker(slots, enabled=settings.state_reuse == "on")
        logger.info(
            "%s: session ready (model %s, %s, load %s ms, %d checkpoint slots)",
            serial,
            self.ready.get("model"),
            self.ready.get("precision"),
            self.ready.get("load_ms"),
            slots,
        )
        return self

    def use_token_text(self, text: TokenBytes | None) -> None:
        """The bundle's token -> bytes, for text-identical state reuse (None: id-prefix reuse only)."""
        self.tracker.text = text

    def reusable(self, prompt_ids: Sequence[int]) -> int:
        return self.tracker.reusable(prompt_ids) if self.alive else 0

    def holding(self) -> Holding:
        return self.tracker.holding() if self.alive else Holding()

    @property
    def alive(self) -> bool:
        return self.closed_reason is None

    @property
    def settling(self) -> asyncio.Task[None] | None:
        cleanup = self._cleanup
        return cleanup if cleanup is not None and not cleanup.done() else None

    async def wait_closed(self) -> str:
        await self._closed.wait()
        assert self.closed_reason is not None
        return self.closed_reason

    def abort(self, reason: str, *, quiet: bool = False) -> None:
        """Kill the process (closing the adb stream does that) and fail whoever waits."""
        if self.closed_reason is None:
            self.closed_reason = reason
            logger.log(
                logging.DEBUG if quiet else logging.WARNING, "%s: session aborted: %s", self.serial, reason
            )
        self._stream.abort()

    async def close(self) -> None:
        """Graceful stop: close stdin (the runtime exits 0), bounded wait, then abort."""
        if self.alive:
            self._stream.close_stdin()
            try:
                async with asyncio.timeout(self._settings.cancel_timeout_s):
                    await self._closed.wait()
            except TimeoutError:
                pass
        if self.closed_reason is None:
            self.closed_reason = "session closed"
        self._stream.abort()
        if self._reader is not None:
            try:
                await self._reader
            except asyncio.CancelledError:
                pass

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        reason = "adb stream closed"
        try:
            while packets := await self._stream.read_packets():
                for kind, data in packets:
                    if kind == STDOUT:
                        self._on_stdout(data)
                    elif kind == STDERR:
                        self._on_stderr(data)
            code = self._stream.exit_code
            if code is None:
                reason = "adb stream dropped (phone or adb link lost)"
            else:
                reason = f"qhx_generate exited with code {code}"
        except (ConnectionError, OSError) as e:
            reason = f"adb stream failed: {e!r}"
        except Exception as e:  # a bug in this module must not leave waiters hanging
            logger.exception("%s: session reader crashed", self.serial)
            reason = f"session reader crashed: {e!r}"
        finally:
            self._stream.abort()  # after EOF asyncio keeps the socket half-open: release it
            self._on_closed(reason)

    def _on_stdout(self, data: bytes) -> None:
        out = self._out
        out += data
        if not self._ready_fut.done():
            head = bytes(out).lstrip()
            if head and not head.startswith(b"{"):
                self._saw_text = True
                self._fail_ready(
                    SessionUnsupported(f"the runtime printed text instead of a `ready` event: {head[:60]!r}")
                )
                self.abort("not a session runtime", quiet=True)
                return
        if b"\n" not in data:
            return
        *lines, rest = out.split(b"\n")
        self._out = bytearray(rest)
        for line in lines:
            if line.strip():
                self._on_line(line)

    def _on_line(self, line: bytes | bytearray) -> None:
        if self.closed_reason is not None:  # aborted: whatever is still buffered is moot
            return
        try:
            ev = json.loads(line)
            kind = ev["ev"] if isinstance(ev, dict) else None
        except (ValueError, KeyError):
            kind = None
        if not isinstance(kind, str):
            if not self._ready_fut.done():
                self._saw_text = True
                self._fail_ready(SessionUnsupported(f"first stdout line is not an event: {line[:60]!r}"))
                self.abort("not a session runtime", quiet=True)
            else:
                logger.warning("%s: skipping garbage stdout line: %r", self.serial, line[:200])
            return
        if not self._ready_fut.done():
            self._on_first_event(kind, ev)
            return
        if kind == "pong":
            fut = self._pings.pop(str(ev.get("id")), None)
            if fut is not None and not fut.done():
                fut.set_result(self._loop.time())
            return
        if kind == "error" and ev.get("id") is None:
            if ev.get("code") == "bad_request":  # a line of ours it could not read an id from
                logger.error("%s: phone rejected a host line: %s", self.serial, ev.get("message"))
                return
            # fatal: the process exits after it; abort anyway so that a restart cannot wait on it
            self._fatal = str(ev.get("message") or ev.get("code") or "fatal error")
            logger.error("%s: runtime fatal error: %s", self.serial, self._fatal)
            self.abort(f"runtime fatal error: {self._fatal}")
            return
        req = self._request
        if req is None:
            logger.warning(
                "%s: %s event with no request in flight (id %r), ignored", self.serial, kind, ev.get("id")
            )
            return
        self._push(req, ev)

    def _on_first_event(self, kind: str, ev: dict[str, Any]) -> None:
        if kind == "ready":
            if ev.get("proto", PROTO) != PROTO:
                logger.warning(
                    "%s: runtime speaks protocol %r, host speaks %d", self.serial, ev.get("proto"), PROTO
                )
            self._ready_fut.set_result(ev)
        elif kind == "error":
            self._fatal = str(ev.get("message") or ev.get("code") or "fatal error")
            self._fail_ready(PhoneLost(f"{self.serial}: runtime failed to start: {self._fatal}"))
        else:
            self._fail_ready(SessionUnsupported(f"first event was {kind!r}, not `ready`"))
            self.abort("not a session runtime", quiet=True)

    def _on_stderr(self, data: bytes) -> None:
        for raw in self._err.feed(data):
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self._stderr_tail.append(line)
                stderr_log.info("[%s] %s", self.serial, line)

    def _push(self, req: _Request, item: dict[str, Any] | _Closed) -> None:
        req.inbox.append(item)
        req.last_at = self._loop.time()
        req.wakeup.set()

    def _fail_ready(self, exc: BaseException) -> None:
        if not self._ready_fut.done():
            self._ready_fut.set_exception(exc)
            self._ready_fut.exception()  # retrieved: no "never retrieved" warning if nobody waits

    def _on_closed(self, reason: str) -> None:
        if self.closed_reason is None:
            self.closed_reason = reason
            if self._fatal:
                self.closed_reason += f" (runtime fatal error: {self._fatal})"
            elif self._stderr_tail and self._stream.exit_code not in (None, 0):
                self.closed_reason += f" (stderr: {self._stderr_tail[-1][:200]})"
            level = logging.INFO if self._stream.exit_code == 0 else logging.WARNING
            logger.log(level, "%s: session ended: %s", self.serial, self.closed_reason)
        if not self._ready_fut.done():
            if self._fatal:
                self._fail_ready(PhoneLost(f"{self.serial}: runtime failed to start: {self._fatal}"))
            elif self._stream.exit_code == 0 or self._saw_text:
                self._fail_ready(
                    SessionUnsupported(f"the runtime exited (code {self._stream.exit_code}) without `ready`")
                )
            else:
                self._fail_ready(PhoneLost(f"{self.serial}: session start: {self.closed_reason}"))
        if self._request is not None:
            self._push(self._request, _Closed(self.closed_reason))
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(PhoneLost(f"{self.serial}: {self.closed_reason}"))
                fut.exception()
        self._pings.clear()
        self._closed.set()

    # ------------------------------------------------------------------ writing

    def _send(self, msg: dict[str, Any]) -> None:
        if not self.alive:
            raise PhoneLost(f"{self.serial}: {self.closed_reason}")
        self._stream.write_stdin(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    async def ping(self, timeout: float = 5.0) -> float:
        """Round trip of a ``ping`` in seconds (answered even while generating)."""
        self._ping_seq += 1
        pid = f"ping-{self._ping_seq}"
        fut: asyncio.Future[float] = self._loop.create_future()
        self._pings[pid] = fut
        t0 = self._loop.time()
        try:
            self._send({"op": "ping", "id": pid})
            async with asyncio.timeout(timeout):
                return await fut - t0
        except TimeoutError:
            raise PhoneStalled(f"{self.serial}: no pong within {timeout:g} s") from None
        finally:
            self._pings.pop(pid, None)

    async def cancel(self, request_id: str) -> None:
        """Ask the phone to stop this request; its ``done`` (reason cancelled) ends the generator."""
        req = self._request
        if req is not None and req.id == request_id:
            req.cancel_wanted = True  # (a rerun in progress sends it once the second attempt is out)
        if req is None or req.id != request_id or req.cancel_deadline is not None or not self.alive:
            return
        req.cancel_deadline = self._loop.time() + self._settings.cancel_timeout_s
        req.wakeup.set()  # re-arm the waiter with the cancel deadline
        self._send({"op": "cancel", "id": request_id})

    # ------------------------------------------------------------------ one request

    async def _next(self, req: _Request, timeout: float) -> dict[str, Any] | _Closed:
        """Next event for req, or PhoneStalled when the phone is silent for ``timeout`` s."""
        while not req.inbox:
            req.wakeup.clear()
            deadline = req.last_at + timeout
            if req.cancel_deadline is not None:
                deadline = min(deadline, req.cancel_deadline)
            try:
                async with asyncio.timeout_at(deadline):
                    await req.wakeup.wait()
            except TimeoutError:
                if req.cancel_deadline is not None and self._loop.time() >= req.cancel_deadline:
                    return _Closed("cancel-timeout")
                raise PhoneStalled(
                    f"{self.serial}: no event for {timeout:g} s during request {req.id}"
                ) from None
        return req.inbox.popleft()

    async def generate(self, params: GenerationParams) -> AsyncIterator[Event]:
        """Run one request on this session; see the module docstring for the failure rules."""
        req = self._begin(params)
        try:
            await self._launch(req, params, self._plan(params))
            while not req.over:
                try:
                    event = self._event(req, params, await self._next(req, req.timeout))
                except _Rerun as again:
                    await self._rerun(req, params, again)
                    continue
                if event is not None:
                    yield event
        except PhoneStalled:
            self.abort(f"stalled during request {req.id}")
            raise
        except (ConnectionError, OSError) as e:
            self.abort(f"adb stream failed: {e!r}")
            raise PhoneLost(f"{self.serial}: adb stream failed during request {req.id}: {e!r}") from e
        finally:
            await self._wind_down(req)

    def _begin(self, params: GenerationParams) -> _Request:
        if self._request is not None:  # events could not be told apart: one request at a time
            raise PhoneBusy(f"{self.serial}: request {self._request.id} is still running")
        if not self.alive:
            raise PhoneLost(f"{self.serial}: {self.closed_reason}")
        req = _Request(params.request_id, last_at=self._loop.time(), timeout=self._settings.stall_timeout_s)
        self._request = req
        return req

    def _plan(self, params: GenerationParams) -> Plan:
        """Where the request starts (reuse.py); ``params.reset`` false: a raw continuation as asked."""
        if not params.reset:
            return self.tracker.raw(params.prompt_ids)
        max_context = self.ready.get("max_context")
        max_state = max_context - params.max_new if type(max_context) is int else None
        plan = self.tracker.plan(params.prompt_ids, params.boundaries, max_state=max_state)
        logger.debug("%s: request %s: %s, %d of %d prompt tokens held, %d sent, saves %s", self.serial,
                     params.request_id, plan.start.kind, plan.cached, len(params.prompt_ids), len(plan.send),
                     [(save.slot, save.at) for save in plan.saves])
        return plan

    async def _launch(self, req: _Request, params: GenerationParams, plan: Plan) -> None:
        """Send the request from ``plan``'s start point; the tracker holds it in flux until it ends."""
        req.plan = plan
        self.tracker.begin(plan)
        self._send(request_message(params, plan))
        await self._stream.drain()

    async def _rerun(self, req: _Request, params: GenerationParams, again: _Rerun) -> None:
        """The phone does not hold what the tracker thought: forget everything it holds, end the first
        attempt (bounded, as a cancel) and run the request again from a reset, saving nothing. No token
        has reached the caller: the reply is the one a reset gives."""
        logger.warning("%s: request %s: %s; the phone is treated as holding nothing and the request runs "
                       "again from a reset", self.serial, req.id, again.why)
        self.tracker.forget()
        if again.running:
            await self._end_attempt(req)
        req.started, req.completion, req.generated, req.rerun = False, 0, [], True
        req.timeout = self._settings.stall_timeout_s
        req.last_at = self._loop.time()
        await self._launch(req, params, Plan(RESET, list(params.prompt_ids)))
        if req.cancel_wanted:  # the consumer asked meanwhile
            req.cancel_deadline = self._loop.time() + self._settings.cancel_timeout_s
            self._send({"op": "cancel", "id": req.id})

    async def _end_attempt(self, req: _Request) -> None:
        """Cancel the attempt the phone is running and wait (bounded) for its ``done`` or ``error``."""
        req.cancel_deadline = self._loop.time() + self._settings.cancel_timeout_s
        self._send({"op": "cancel", "id": req.id})
        while True:
            item = await self._next(req, self._settings.cancel_timeout_s)
            if isinstance(item, _Closed):
                if item.reason == "cancel-timeout":
                    self.abort(f"no `done` within {self._settings.cancel_timeout_s:g} s of cancel")
                raise PhoneLost(f"{self.serial}: {self.closed_reason or item.reason} during request {req.id}")
            if item.get("ev") in ("done", "error") and item.get("id") == req.id:
                req.cancel_deadline = None
                return

    def _event(self, req: _Request, params: GenerationParams, item: dict[str, Any] | _Closed) -> Event | None:
        """The contract event for one item of the inbox (None: nothing to tell); raises on failures."""
        if isinstance(item, _Closed):
            return self._on_closed_item(req, item)
        kind = item["ev"]
        if kind not in ("start", "tok", "done", "error"):
            logger.info("%s: request %s: unknown event %r ignored", self.serial, req.id, kind)
            return None
        if item.get("id") != req.id:
            raise self._violation(req, f"{kind} event for id {item.get('id')!r}")
        if kind == "tok":
            return self._on_tok(req, item)
        if kind == "start":
            return self._on_start(req, params, item)
        if kind == "done":
            return self._on_done(req, params, item)
        return self._on_error(req, params, item)

    def _on_error(self, req: _Request, params: GenerationParams, item: dict[str, Any]) -> Event:
        code = item.get("code")
        plan = req.plan
        if not req.started and params.reset and not req.rerun:  # (never for a raw continuation)
            said = f"{code}: {item.get('message')}"
            if plan.start != RESET and code in RERUN_CODES:
                raise _Rerun(f"the phone refused its start point ({said})", running=False)
            if plan.saves and code == "bad_request":  # saves from an empty state: always inside the prompt
                logger.warning("%s: the runtime refused checkpoint saves (%s): its checkpoints are not "
                               "used any more", self.serial, said)
                self.tracker.drop_checkpoints()
                raise _Rerun(f"the phone refused its saves ({said})", running=False)
        req.over = True
        self._end(req)
        self.tracker.finish(req.plan, None, [] if not req.started else None)
        raise request_error(item, self.serial)

    def _on_closed_item(self, req: _Request, item: _Closed) -> Event:
        if item.reason != "cancel-timeout":
            raise PhoneLost(f"{self.serial}: {item.reason} during request {req.id}")
        self.abort(f"no `done` within {self._settings.cancel_timeout_s:g} s of cancel")
        req.over = True
        self._end(req)
        return Finished(req.id, "cancelled", 0, req.completion, 0.0, 0.0)

    def _on_tok(self, req: _Request, item: dict[str, Any]) -> Tokens:
        if not req.started:
            raise self._violation(req, "tok before start")
        ids, t_ms = self._tok_fields(req, item)
        # the consumer was slower than the phone: hand over all waiting tokens at once
        while req.inbox:
            nxt = req.inbox[0]
            if isinstance(nxt, _Closed) or nxt.get("ev") != "tok" or nxt.get("id") != req.id:
                break
            req.inbox.popleft()
            more, t_ms = self._tok_fields(req, nxt)
            ids.extend(more)
        req.completion += len(ids)
        req.generated.extend(ids)
        req.timeout = self._settings.stall_timeout_s
        return Tokens(req.id, ids, t_ms)

    def _on_start(self, req: _Request, params: GenerationParams, item: dict[str, Any]) -> Started:
        if req.started:
            raise self._violation(req, "second start")
        prompt_tokens = self._int(req, item, "prompt_tokens", len(req.plan.send))
        state_tokens = self._int(req, item, "state_tokens", 0)
        plan = req.plan
        restored = item.get("restored", plan.start.restore)
        if plan.known and (state_tokens != plan.state_tokens or restored != plan.start.restore):
            said = f"state_tokens {state_tokens}, restored {restored!r}"
            expected = f"{plan.state_tokens}, {plan.start.restore!r}"
            if plan.start == RESET or req.rerun:
                raise self._violation(req, f"start with {said} after a reset")
            if not params.reset:  # a raw continuation, as the caller asked: what it continues is unknown
                logger.warning("%s: request %s continues from %s, the host expected %s", self.serial, req.id,
                               said, expected)
                self.tracker.forget()
                plan = req.plan = Plan(plan.start, plan.send, known=False)
            else:
                    raise _Rerun(f"the phone started from {said}, the host expected {expected} "
                             f"({plan.start.kind})", running=True)
        req.started = True
        # decode-over-prompt: the first token waits for the whole prompt (the part sent)
        req.timeout = self._settings.stall_timeout_s + prompt_tokens * self._settings.prefill_ms_per_token / 1000
        prompt = len(params.prompt_ids) if params.reset else prompt_tokens
        return Started(req.id, prompt, state_tokens, self.serial, cached_tokens=plan.cached)

    def _on_done(self, req: _Request, params: GenerationParams, item: dict[str, Any]) -> Finished:
        if not req.started:
            raise self._violation(req, "done before start")
        reason = item.get("reason")
        if reason not in FINISH_REASONS:
            raise self._violation(req, f"done with reason {reason!r}")
        req.over = True
        self._end(req)
        self.tracker.finish(req.plan, req.generated if reason != "cancelled" else None, self._saved(item))
        return Finished(
            req.id,
            reason,
            len(params.prompt_ids) if params.reset else self._int(req, item, "prompt_tokens", 0),
            self._int(req, item, "completion_tokens", req.completion),
            self._ms(item, "prefill_ms"),
            self._ms(item, "decode_ms"),
        )

    def _saved(self, item: dict[str, Any]) -> list[tuple[int, int]]:
        """``done.saved`` as (slot, tokens); entries that are not two integers are left out (their
        slot then stays unknown to the tracker)."""
        saved = item.get("saved")
        if not isinstance(saved, list):
            return []
        out = []
        for entry in saved:
            if isinstance(entry, dict) and type(entry.get("slot")) is int and type(entry.get("tokens")) is int:
                out.append((entry["slot"], entry["tokens"]))
            else:
                logger.warning("%s: done.saved entry %r ignored", self.serial, entry)
        return out

    async def _wind_down(self, req: _Request) -> None:
        """However generate() ended: a request the consumer left is cancelled on the phone, bounded."""
        if req.over:
            return
        if self.alive and self._request is req:
            # the consumer left (aclose or cancellation): stop the phone, bounded; shielded so that a
            # second cancellation cannot leave the phone generating for nobody (``settling`` meanwhile)
            self._cleanup = asyncio.create_task(self._cancel_and_drain(req))
            await asyncio.shield(self._cleanup)
        else:
            self._end(req)

    def _tok_fields(self, req: _Request, ev: dict[str, Any]) -> tuple[list[int], float | None]:
        ids = ev.get("ids")
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise self._violation(req, f"tok without a list of int ids: {ev!r:.120}")
        t_ms = ev.get("t_ms")
        return list(ids), float(t_ms) if isinstance(t_ms, (int, float)) else None

    def _int(self, req: _Request, ev: dict[str, Any], key: str, default: int) -> int:
        value = ev.get(key, default)
        if type(value) is not int:
            raise self._violation(req, f"{ev.get('ev')} with {key}={value!r}")
        return value

    @staticmethod
    def _ms(ev: dict[str, Any], key: str) -> float:
        value = ev.get(key)
        return float(value) if isinstance(value, (int, float)) else 0.0

    def _violation(self, req: _Request, what: str) -> ProtocolViolation:
        self.abort(f"protocol violation in request {req.id}: {what}")
        return ProtocolViolation(f"{self.serial}: protocol violation in request {req.id}: {what}")

    def _end(self, req: _Request) -> None:
        """req's events are all in: the next request's events go to the next request."""
        if self._request is req:
            self._request = None

    def _drained_start(self, req: _Request, item: dict[str, Any]) -> None:
        """The ``start`` of a request the consumer left: checked like any other (the state it ends with
        is known only if it started where the tracker expected)."""
        plan = req.plan
        if not plan.known or (item.get("state_tokens"), item.get("restored", plan.start.restore)) == (
            plan.state_tokens, plan.start.restore
        ):
            req.started = True
            return
        logger.warning("%s: request %s (left by its consumer) started from state_tokens %r, the host "
                       "expected %d: the phone is treated as holding nothing", self.serial, req.id,
                       item.get("state_tokens"), plan.state_tokens)
        self.tracker.forget()
        req.plan = Plan(RESET, [], known=False)

    def _drained(self, req: _Request, item: dict[str, Any]) -> None:
        """What a request the consumer left ended with, for the tracker: a ``done`` that was not a cancel
        (it finished first) leaves a known state."""
        if item.get("ev") == "error":
            self.tracker.finish(req.plan, None, [] if not req.started else None)
            return
        finished = item.get("reason") in ("stop", "length") and req.started
        self.tracker.finish(req.plan, req.generated if finished else None, self._saved(item))

    async def _cancel_and_drain(self, req: _Request) -> None:
        t0 = time.monotonic()
        try:
            if req.cancel_deadline is None:
                req.cancel_deadline = self._loop.time() + self._settings.cancel_timeout_s
                self._send({"op": "cancel", "id": req.id})
            while True:
                item = await self._next(req, self._settings.cancel_timeout_s)
                if isinstance(item, _Closed):
                    if item.reason == "cancel-timeout":
                        self.abort(f"no `done` within {self._settings.cancel_timeout_s:g} s of cancel")
                    return
                if item.get("id") != req.id:
                    continue
                if item.get("ev") == "start":
                    self._drained_start(req, item)
                if item.get("ev") == "tok" and isinstance(item.get("ids"), list):
                    req.generated.extend(i for i in item["ids"] if type(i) is int)
                if item.get("ev") in ("done", "error"):
                    self._drained(req, item)
                    logger.debug(
                        "%s: request %s cancelled in %.1f ms",
                        self.serial,
                        req.id,
                        (time.monotonic() - t0) * 1e3,
                    )
                    return
        except (PhoneStalled, PhoneLost) as e:
            self.abort(f"cancel of {req.id} failed: {e}")
        except Exception:
            logger.exception("%s: cancel of %s failed", self.serial, req.id)
            self.abort(f"cancel of {req.id} failed")
        finally:
            self._end(req)
