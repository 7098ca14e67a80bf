"""One phone as a Backend: discovery, a supervised runtime (session or one-shot), health.

State machine (PhoneState)::

    OFFLINE --start()--> STARTING --ready--> READY <--> BUSY
                            |   ^              |
                            |   |      session died / stalled
                            v   |              v
                  INCOMPATIBLE  +--(backoff)-- RESTARTING      (a failure, fewer than quarantine_after
                                |                               in a row)
                                +--(backoff)-- QUARANTINED     (quarantine_after failures in a row)

A supervisor task discovers the phone, starts its runtime (runtime.py: a session, or one-shot mode;
launcher.py picks one) and waits for it to end; an ended runtime is restarted with exponential backoff
capped at ``settings.restart_backoff_max_s`` (reset once a runtime has served a request or lived a
minute). Every state change calls ``on_change(phone)`` so that a scheduler can react (phone ready,
idle, gone).

The phone's state (READY, BUSY ...) and the request in flight are the Phone's alone: it marks the
phone BUSY when it admits a request and ends the request itself (READY again) when the runtime
finished it, or, when the consumer left early, once the runtime let go of it (``runtime.settling``).

Health (quarantine) lives here, in the phone's supervisor, not in the pool: a *failure* is a runtime
that ended (a request that stalled, crashed or broke the protocol ends its session; so does a phone
that dies while idle), a runtime start that failed, or a request that failed that way while its
runtime lived on (one-shot mode: one process per request). After ``quarantine_after`` failures in a row the phone is QUARANTINED (out of rotation, its
``last_error`` and ``retry_in_s`` in its health) for ``quarantine_s``, doubled at each further failure
up to ``quarantine_max_s``, then started again. A request that finishes resets the count; so does
plugging the phone in again (start from OFFLINE). The pool only routes to READY phones.

State reuse (docs/state-reuse.md) is the runtime's: a session tracks what its process holds and
starts each request where it can (reuse.py, session.py). The phone passes on what routing weighs:
``reusable(prompt_ids)`` (prompt tokens it would not process again) and ``prefill_ms_per_token``
(measured from ``Finished.prefill_ms`` over the tokens processed), and reports the live state's
length and the checkpoint slots in its health.

Health over time (telemetry.py) runs beside the supervisor from ``start()`` to ``stop()``: its own
task and adb stream read the phone's temperature, thermal status and battery every
``telemetry_poll_s``; the phone passes on to routing its ``condition`` (thermal status, temperature,
and whether it is drained: too hot or low on battery), calls ``on_change`` when any of that
changes, and reports all of it, with its measured decode rate, in its health.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence

from adbutils.errors import AdbError

from server.backends.adb.discovery import PhoneFacts, discover
from server.backends.adb.launcher import Launcher
from server.backends.adb.reuse import Holding
from server.backends.adb.runtime import Runtime
from server.backends.adb.telemetry import PhoneTelemetry
from server.backends.adb.transport import AdbServerClient
from server.backends.base import (
    Backend,
    Event,
    Finished,
    GenerationParams,
    ModelInfo,
    PhoneCondition,
    PhoneHealth,
    PhoneState,
    Started,
    Tokens,
)
from server.errors import (
    BackendError,
    ContextLengthExceeded,
    ModelNotFound,
    NoPhoneAvailable,
    PhoneBusy,
    PhoneLost,
    PhoneStalled,
    ProtocolViolation,
)
from server.settings import Settings

logger = logging.getLogger(__name__)

STABLE_SESSION_S = 60.0  # a runtime that lived this long resets the restart backoff
PREFILL_SAMPLE_MIN = 4  # prompt tokens a request must process to measure their cost (prefill_ms_per_token)
PREFILL_EMA = 0.3  # weight of the newest measurement in that average
# request errors that are the phone's fault (a rejected request, PhoneRequestError, is not)
PHONE_FAULTS = (PhoneLost, PhoneStalled, ProtocolViolation)


class Phone(Backend):
    """One phone on one adb server. ``await start()`` begins supervision; ``generate()`` serves."""

    def __init__(
        self,
        serial: str,
        adb_server: str,
        settings: Settings,
        *,
        client: AdbServerClient | None = None,
        on_change: Callable[[Phone], None] | None = None,
    ) -> None:
        self.serial = serial
        self.adb_server = adb_server
        self.key = f"{adb_server}/{serial}"
        self.settings = settings
        self.state = PhoneState.OFFLINE
        self.state_since = time.monotonic()
        self.model: ModelInfo | None = None
        self.facts: PhoneFacts | None = None
        self.last_error: str | None = None
        self.on_change = on_change
        self._client = client or AdbServerClient(adb_server, timeout=settings.adb_timeout_s)
        self._launcher = Launcher(self._client, serial, settings, name=self.key)
        self._runtime: Runtime | None = None  # the last one started (kept after it ended: its kind)
        self._supervisor: asyncio.Task[None] | None = None
        self._request_id: str | None = None  # the request in flight (set exactly while it is BUSY)
        self._tokens_served = 0
        self._last_tps: float | None = None
        self._ready_since: float | None = None
        self._failures = 0  # in a row; see the module docstring (health)
        self._quarantine_until: float | None = None  # time.monotonic()
        self._cached = 0  # Started.cached_tokens of the request in flight
        self._prefill_ms_per_token: float | None = None
        # temperature, battery, decode rate and the drain decision: polled beside the supervisor
        self.telemetry = PhoneTelemetry(self._client, serial, settings, name=self.key, on_change=self._announce)

    def __repr__(self) -> str:
        return f"<Phone {self.key} {self.state.value} {self.mode or '-'}>"

    @property
    def runtime(self) -> Runtime | None:
        """The runtime started last (it may have ended since); None before the first and after stop."""
        return self._runtime

    @property
    def mode(self) -> str | None:
        """The kind of the runtime started last: ``session`` or ``oneshot`` (None before the first)."""
        return self._runtime.kind if self._runtime is not None else None

    # ------------------------------------------------------------------ state

    def _set_state(self, state: PhoneState, error: str | None = None) -> None:
        if error is not None:
            self.last_error = error
        if state is self.state:
            return
        logger.info("%s: %s -> %s%s", self.key, self.state.value, state.value, f" ({error})" if error else "")
        self.state = state
        self.state_since = time.monotonic()
        if state is PhoneState.READY and self._ready_since is None:
            self._ready_since = time.monotonic()
        elif state not in (PhoneState.READY, PhoneState.BUSY):
            self._ready_since = None
        self._announce()

    def _announce(self) -> None:
        """Tell the scheduler that something it routes by changed (a state, the phone's condition)."""
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                logger.exception("%s: on_change hook failed", self.key)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start (or restart, after stop) the supervisor. Returns at once; watch ``state``."""
        if self._supervisor is not None and not self._supervisor.done():
            return
        if self.state is PhoneState.OFFLINE:
            self._failures = 0  # plugged in (again): a fresh start
        self._supervisor = asyncio.create_task(self._supervise(), name=f"qhx-phone-{self.key}")
        self.telemetry.start()

    async def stop(self, reason: str = "stopped", *, graceful: bool = True) -> None:
        """Stop supervising and end the runtime (a request in flight fails with PhoneLost); OFFLINE."""
        sup, self._supervisor = self._supervisor, None
        await self.telemetry.stop()
        if sup is not None and not sup.done():
            sup.cancel()
            try:
                await sup
            except asyncio.CancelledError:
                pass
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            if graceful:
                await runtime.close()
            else:
                runtime.abort(reason)
        self._launcher.reset()
        self._set_state(PhoneState.OFFLINE, reason)

    async def aclose(self) -> None:
        await self.stop("closed")

    async def _supervise(self) -> None:
        """Start the runtime, serve until it ends, start it again (backoff, quarantine), for ever."""
        attempt = 0
        facts: PhoneFacts | None = None
        while True:
            await self._wait_before_start(attempt)
            self._set_state(PhoneState.STARTING)
            attempt += 1
            try:
                if facts is None:  # rediscover unless the last runtime got going with these facts
                    facts = await self._discover()
                if facts.problem is not None:
                    self._incompatible(facts.problem)
                    return
                runtime = await self._launcher.start(facts)
                if await self._serve(runtime):
                    attempt = 1
            except (BackendError, AdbError, OSError) as e:
                logger.warning("%s: start failed: %s", self.key, e)
                self.last_error = str(e)
                self._failures += 1
                facts = None

    async def _wait_before_start(self, attempt: int) -> None:
        """Quarantine after too many failures in a row; else back off after a failed attempt."""
        if self._failures >= self.settings.quarantine_after:
            await self._quarantine()
        elif attempt:
            delay = min(2.0 ** (attempt - 1), self.settings.restart_backoff_max_s)
            self._set_state(PhoneState.RESTARTING)
            logger.info("%s: restarting in %.1f s (attempt %d)", self.key, delay, attempt + 1)
            await asyncio.sleep(delay)

    async def _discover(self) -> PhoneFacts:
        facts = await discover(self._client, self.serial, self.settings)
        self.facts, self.model = facts, facts.model
        return facts

    def _incompatible(self, problem: str) -> None:
        if problem != self.last_error:  # rechecked now and then: say it once
            logger.error("%s: cannot serve: %s", self.key, problem)
        self._set_state(PhoneState.INCOMPATIBLE, problem)

    async def _serve(self, runtime: Runtime) -> bool:
        """READY on ``runtime`` until it ends, which is a failure; whether it served well (a request,
        or a minute), which resets the restart backoff."""
        self._runtime = runtime
        served_before, since = self._tokens_served, time.monotonic()
        self._set_state(PhoneState.READY, None)
        reason = await runtime.wait_closed()  # stop() cancels this task: a runtime that ends here failed
        if self._quarantine_until is None:  # (else the request that quarantined the phone counted it)
            self.last_error = reason
            self._failures += 1
        return self._tokens_served > served_before or time.monotonic() - since > STABLE_SESSION_S

    def _enter_quarantine(self) -> None:
        """QUARANTINED for the backoff of the current failure series (see the module docstring)."""
        k = self._failures - self.settings.quarantine_after
        delay = min(self.settings.quarantine_s * 2.0**k, self.settings.quarantine_max_s)
        logger.warning("%s: quarantined for %.1f s after %d failures in a row (last: %s)", self.key, delay,
                       self._failures, self.last_error)
        self._quarantine_until = time.monotonic() + delay
        self._set_state(PhoneState.QUARANTINED)

    async def _quarantine(self) -> None:
        """Out of rotation until the quarantine is over, then back to the caller (the supervisor)."""
        if self._quarantine_until is None:
            self._enter_quarantine()
        try:
            await asyncio.sleep(max(0.0, (self._quarantine_until or 0.0) - time.monotonic()))
        finally:
            self._quarantine_until = None

    # ------------------------------------------------------------------ the contract

    async def generate(self, params: GenerationParams) -> AsyncIterator[Event]:
        await self._settled()
        runtime = self._admit(params)
        rid = params.request_id
        self._request_id = rid
        self._set_state(PhoneState.BUSY)
        source = runtime.generate(params)
        counted = False  # this request's failure was counted here
        try:
            async for ev in source:
                self._account(ev)
                if isinstance(ev, Finished):
                    self._end_request(runtime, rid)  # the runtime is idle: so is the phone
                yield ev
        except BackendError as e:
            counted = self._count_failure(e, runtime)
            raise
        finally:
            await source.aclose()  # type: ignore[attr-defined]
            self._end_request_once_settled(runtime, rid, counted)

    async def _settled(self) -> None:
        """Wait, bounded, while the runtime still winds down a request whose consumer left."""
        settling = self._runtime.settling if self._runtime is not None else None
        if settling is not None:
            # the previous request is still being cancelled on the phone (bounded by cancel_timeout_s)
            await asyncio.wait([settling], timeout=self.settings.cancel_timeout_s + 1)

    def _admit(self, params: GenerationParams) -> Runtime:
        if self.state is PhoneState.BUSY:
            raise PhoneBusy(f"{self.serial}: request {self._request_id} is still running")
        if self.state is not PhoneState.READY or self.model is None or self._runtime is None:
            raise NoPhoneAvailable(
                f"phone {self.serial} is {self.state.value}: {self.last_error or 'not ready'}"
            )
        if params.model and params.model != self.model.name:
            raise ModelNotFound(f"phone {self.serial} serves {self.model.name}, not {params.model}")
        if params.reset and len(params.prompt_ids) >= self.model.max_context:
            raise ContextLengthExceeded(
                f"prompt is {len(params.prompt_ids)} tokens; {self.model.name} has a context of "
                f"{self.model.max_context} (prompt plus generated tokens)"
            )
        return self._runtime

    def _account(self, ev: Event) -> None:
        if isinstance(ev, Tokens):
            self._tokens_served += len(ev.ids)
        elif isinstance(ev, Started):
            self._cached = ev.cached_tokens
        elif isinstance(ev, Finished):
            self._failures = 0
            self.telemetry.rate.add(ev.completion_tokens, ev.decode_ms)
            if ev.decode_ms > 0 and ev.completion_tokens > 0:
                self._last_tps = ev.completion_tokens / (ev.decode_ms / 1000)
            processed = ev.prompt_tokens - self._cached
            if self.mode == "session" and ev.reason != "cancelled" and processed >= PREFILL_SAMPLE_MIN:
                sample = ev.prefill_ms / processed
                last = self._prefill_ms_per_token
                self._prefill_ms_per_token = sample if last is None else last + PREFILL_EMA * (sample - last)

    def _count_failure(self, e: BackendError, runtime: Runtime) -> bool:
        """Note a failed request; whether it counts as a failure here: a phone fault its runtime
        survived (a runtime that ended is counted by the supervisor)."""
        self.last_error = str(e)
        if isinstance(e, PHONE_FAULTS) and runtime.alive:
            self._failures += 1
            return True
        return False

    def _end_request_once_settled(self, runtime: Runtime, rid: str, counted: bool) -> None:
        settling = runtime.settling
        if settling is None:
            self._end_request(runtime, rid, counted)
        else:  # the consumer left and the phone is still finishing: the phone is busy until then
            settling.add_done_callback(lambda _: self._end_request(runtime, rid, counted))

    def _end_request(self, runtime: Runtime, rid: str, counted: bool = False) -> None:
        """Request ``rid`` is over on the phone: READY again, unless its runtime ended (the supervisor
        restarts it) or its failure was one too many (QUARANTINED; the supervisor waits it out)."""
        if self._request_id != rid:
            return
        self._request_id = None
        if self.state is not PhoneState.BUSY:
            return  # the supervisor took over (the runtime ended)
        if not runtime.alive:
            self._set_state(PhoneState.RESTARTING)  # the supervisor takes it from here
        elif counted and self._failures >= self.settings.quarantine_after:
            self._enter_quarantine()
            runtime.abort(f"quarantined: {self.last_error}")  # the supervisor waits the quarantine out
        else:
            self._set_state(PhoneState.READY)

    def reusable(self, prompt_ids: Sequence[int]) -> int:
        """Prompt tokens this phone would not process again if asked to run ``prompt_ids`` now (what
        routing weighs; 0 when it holds nothing of it, runs one-shot, or state reuse is off). While it
        is busy: what it holds that the running request does not change (its live state and the slots
        it saves to are known again when that request ends)."""
        runtime = self._runtime
        if runtime is None or self.state not in (PhoneState.READY, PhoneState.BUSY):
            return 0
        return runtime.reusable(prompt_ids)

    @property
    def prefill_ms_per_token(self) -> float | None:
        """Its measured cost of one processed prompt token, in ms: ``Finished.prefill_ms`` over the
        tokens processed (the prompt less ``Started.cached_tokens``), a moving average over session
        requests that processed at least ``PREFILL_SAMPLE_MIN`` tokens; None until measured."""
        return self._prefill_ms_per_token

    async def cancel(self, request_id: str) -> None:
        if self._request_id == request_id and self._runtime is not None:
            await self._runtime.cancel(request_id)

    def models(self) -> list[ModelInfo]:
        if self.model is None or self.state in (
            PhoneState.OFFLINE,
            PhoneState.INCOMPATIBLE,
            PhoneState.QUARANTINED,
        ):
            return []
        return [self.model]

    @property
    def condition(self) -> PhoneCondition:
        """What routing weighs of its health: thermal status, temperature, whether it is drained."""
        return self.telemetry.condition

    def health(self) -> list[PhoneHealth]:
        facts = self.facts
        until = self._quarantine_until
        runtime = self._runtime
        held = runtime.holding() if runtime is not None else Holding()
        row = PhoneHealth(
            serial=self.serial,
            adb_server=self.adb_server,
            state=self.state,
            model=self.model.name if self.model else None,
            product_model=facts.product_model if facts else None,
            soc=facts.soc if facts else None,
            bundles=[b.name for b in facts.bundles] if facts else [],
            bundle=facts.bundle.name if facts and facts.bundle else None,
            mode=self.mode,
            request_in_flight=self._request_id,
            tokens_served=self._tokens_served,
            last_decode_tps=self._last_tps,
            last_error=self.last_error,
            uptime_s=time.monotonic() - self._ready_since if self._ready_since else 0.0,
            simulated=facts.simulated if facts else False,
            failures=self._failures,
            retry_in_s=max(0.0, until - time.monotonic()) if until is not None else None,
            state_tokens=held.state_tokens,
            checkpoint_slots=held.slots,
            checkpoints_used=held.used,
        )
        self.telemetry.fill(row)
        return [row]

    async def ping(self, timeout: float = 5.0) -> float | None:
        """Round trip to the runtime's process in seconds (None in one-shot mode or without a runtime)."""
        if self._runtime is None or not self._runtime.alive:
            return None
        return await self._runtime.ping(timeout)
