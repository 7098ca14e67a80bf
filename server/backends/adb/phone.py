"""One phone as a Backend: discovery, a supervised session (or one-shot mode), health.

State machine (PhoneState)::

    OFFLINE --start()--> STARTING --ready--> READY <--> BUSY
                            |   ^              |
                            |   |      session died / stalled
                            v   |              v
                  INCOMPATIBLE  +--(backoff)-- RESTARTING      (a failure, fewer than quarantine_after
                                |                               in a row)
                                +--(backoff)-- QUARANTINED     (quarantine_after failures in a row)

A supervisor task discovers the phone, starts the session and waits for it to end; a dead session is
restarted with exponential backoff capped at ``settings.restart_backoff_max_s`` (reset once a session
has served a request or lived a minute). ``device_mode=auto`` falls back to one-shot for this phone,
logged once, when the runtime does not answer the session start with ``ready``. Every state change
calls ``on_change(phone)`` so that a scheduler can react (phone ready, idle, gone).

Health (quarantine) lives here, in the phone's supervisor, not in the pool: a *failure* is a session
that ended (a request that stalled, crashed or broke the protocol ends its session; so does a phone
that dies while idle), a session start that failed, or, in one-shot mode, a request that failed that
way. After ``quarantine_after`` failures in a row the phone is QUARANTINED (out of rotation, its
``last_error`` and ``retry_in_s`` in its health) for ``quarantine_s``, doubled at each further failure
up to ``quarantine_max_s``, then started again. A request that finishes resets the count; so does
plugging the phone in again (start from OFFLINE). The pool only routes to READY phones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from adbutils.errors import AdbError

from server.backends.adb.discovery import PhoneFacts, discover
from server.backends.adb.oneshot import OneShot
from server.backends.adb.quoting import render_launch
from server.backends.adb.session import Session, SessionUnsupported
from server.backends.adb.transport import AdbServerClient
from server.backends.base import (
    Backend,
    Event,
    Finished,
    GenerationParams,
    ModelInfo,
    PhoneHealth,
    PhoneState,
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

STABLE_SESSION_S = 60.0  # a session that lived this long resets the restart backoff
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
        self.mode: str | None = None  # session | oneshot
        self.last_error: str | None = None
        self.on_change = on_change
        self._client = client or AdbServerClient(adb_server, timeout=settings.adb_timeout_s)
        self._session: Session | None = None
        self._oneshot: OneShot | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._request_id: str | None = None
        self._tokens_served = 0
        self._last_tps: float | None = None
        self._ready_since: float | None = None
        self._fallback_logged = False
        self._failures = 0  # in a row; see the module docstring (health)
        self._quarantine_until: float | None = None  # time.monotonic()

    def __repr__(self) -> str:
        return f"<Phone {self.key} {self.state.value} {self.mode or '-'}>"

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
        if self.on_change is not None:
            try:
                self.on_change(self)
            except Exception:
                logger.exception("%s: on_change hook failed", self.key)

    def _on_session_idle(self) -> None:
        if self.state is PhoneState.BUSY and self._session is not None and self._session.alive:
            self._set_state(PhoneState.READY)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start (or restart, after stop) the supervisor. Returns at once; watch ``state``."""
        if self._supervisor is not None and not self._supervisor.done():
            return
        if self.state is PhoneState.OFFLINE:
            self._failures = 0  # plugged in (again): a fresh start
        self._supervisor = asyncio.create_task(self._supervise(), name=f"qhx-phone-{self.key}")

    async def stop(self, reason: str = "stopped", *, graceful: bool = True) -> None:
        """Stop supervising and end the session (a request in flight fails with PhoneLost); OFFLINE."""
        sup, self._supervisor = self._supervisor, None
        if sup is not None and not sup.done():
            sup.cancel()
            try:
                await sup
            except asyncio.CancelledError:
                pass
        session, self._session = self._session, None
        if session is not None:
            if graceful:
                await session.close()
            else:
                session.abort(reason)
        self._oneshot = None
        self.mode = None
        self._set_state(PhoneState.OFFLINE, reason)

    async def aclose(self) -> None:
        await self.stop("closed")

    def launch_command(self, prompt: str, max_new: int) -> str:
        assert self.facts is not None and self.facts.bundle is not None
        bundle = self.facts.bundle
        return render_launch(
            self.settings.launch_command,
            root=self.settings.device_root,
            manifest=bundle.manifest_path,
            artifacts=bundle.name,
            max_new=max_new,
            prompt=prompt,
        )

    async def _supervise(self) -> None:
        attempt = 0
        facts: PhoneFacts | None = None
        while True:
            if self._failures >= self.settings.quarantine_after:
                await self._quarantine()
            elif attempt:
                delay = min(2.0 ** (attempt - 1), self.settings.restart_backoff_max_s)
                self._set_state(PhoneState.RESTARTING)
                logger.info("%s: restarting in %.1f s (attempt %d)", self.key, delay, attempt + 1)
                await asyncio.sleep(delay)
            self._set_state(PhoneState.STARTING)
            attempt += 1
            try:
                if facts is None:  # rediscover unless the last session got going with these facts
                    facts = await discover(self._client, self.serial, self.settings)
                    self.facts, self.model = facts, facts.model
                if facts.problem is not None:
                    if facts.problem != self.last_error:  # rechecked now and then: say it once
                        logger.error("%s: cannot serve: %s", self.key, facts.problem)
                    self._set_state(PhoneState.INCOMPATIBLE, facts.problem)
                    return
                if self.settings.device_mode == "oneshot" or self.mode == "oneshot":
                    self._start_oneshot(facts)
                    return  # nothing long-lived to supervise
                try:
                    session = await Session.start(
                        self._client,
                        self.serial,
                        self.launch_command("-", self.settings.session_max_new),
                        self.settings,
                        on_idle=self._on_session_idle,
                    )
                except SessionUnsupported as e:
                    if self.settings.device_mode != "auto":
                        raise PhoneLost(f"{self.serial}: device_mode=session but {e}") from e
                    if not self._fallback_logged:
                        logger.warning(
                            "%s: no session protocol (%s); using one-shot mode for this phone", self.key, e
                        )
                        self._fallback_logged = True
                    self._start_oneshot(facts)
                    return
                self._check_ready(session)
                self._session, self.mode = session, "session"
                served_before = self._tokens_served
                self._set_state(PhoneState.READY, None)
                since = time.monotonic()
                reason = await session.wait_closed()
                self._session = None
                if self._tokens_served > served_before or time.monotonic() - since > STABLE_SESSION_S:
                    attempt = 1
                self.last_error = reason
                self._failures += 1  # stop() cancels this task: a session that ends here failed
            except (BackendError, AdbError, OSError) as e:
                logger.warning("%s: start failed: %s", self.key, e)
                self.last_error = str(e)
                self._failures += 1
                facts = None

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

    def _start_oneshot(self, facts: PhoneFacts) -> None:
        assert facts.bundle is not None
        self.mode = "oneshot"
        self._oneshot = OneShot(self._client, self.serial, self.settings, facts.bundle)
        self._set_state(PhoneState.READY, None)

    def _check_ready(self, session: Session) -> None:
        ready, model = session.ready, self.model
        if model is None:
            return
        if ready.get("max_context") not in (None, model.max_context) and self.settings.max_context is None:
            logger.warning(
                "%s: runtime says max_context %s, manifest name says %d; using %d",
                self.key,
                ready.get("max_context"),
                model.max_context,
                model.max_context,
            )

    # ------------------------------------------------------------------ the contract

    async def generate(self, params: GenerationParams) -> AsyncIterator[Event]:
        session = self._session
        if session is not None and session.pending_cleanup is not None and not session.pending_cleanup.done():
            # the previous request is still being cancelled on the phone (bounded by cancel_timeout_s)
            await asyncio.wait([session.pending_cleanup], timeout=self.settings.cancel_timeout_s + 1)
        self._admit(params)
        self._request_id = params.request_id
        self._set_state(PhoneState.BUSY)
        source: AsyncIterator[Event]
        if self.mode == "session" and self._session is not None:
            source = self._session.generate(params)
        else:
            assert self._oneshot is not None
            source = self._oneshot.generate(params)
        try:
            async for ev in source:
                if isinstance(ev, Tokens):
                    self._tokens_served += len(ev.ids)
                elif isinstance(ev, Finished):
                    self._failures = 0
                    if ev.decode_ms > 0 and ev.completion_tokens > 0:
                        self._last_tps = ev.completion_tokens / (ev.decode_ms / 1000)
                yield ev
        except BackendError as e:
            self.last_error = str(e)
            if self.mode == "oneshot" and isinstance(e, PHONE_FAULTS):
                self._failures += 1  # (in session mode the supervisor counts the session's end)
            raise
        finally:
            await source.aclose()  # type: ignore[attr-defined]
            self._request_id = None
            if self.state is PhoneState.BUSY:
                if self.mode == "oneshot" and self._failures >= self.settings.quarantine_after:
                    self._enter_quarantine()  # the supervisor waits it out, then starts over
                    self._supervisor = asyncio.create_task(self._supervise(), name=f"qhx-phone-{self.key}")
                elif self.mode == "oneshot":
                    self._set_state(PhoneState.READY)
                elif self._session is None or not self._session.alive:
                    self._set_state(PhoneState.RESTARTING)  # the supervisor takes it from here

    def _admit(self, params: GenerationParams) -> None:
        if self.state is PhoneState.BUSY:
            raise PhoneBusy(f"{self.serial}: request {self._request_id} is still running")
        if self.state is not PhoneState.READY or self.model is None:
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

    async def cancel(self, request_id: str) -> None:
        if self._request_id != request_id:
            return
        if self.mode == "session" and self._session is not None:
            await self._session.cancel(request_id)
        elif self._oneshot is not None:
            await self._oneshot.cancel(request_id)

    def models(self) -> list[ModelInfo]:
        if self.model is None or self.state in (
            PhoneState.OFFLINE,
            PhoneState.INCOMPATIBLE,
            PhoneState.QUARANTINED,
        ):
            return []
        return [self.model]

    def health(self) -> list[PhoneHealth]:
        facts = self.facts
        until = self._quarantine_until
        return [
            PhoneHealth(
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
            )
        ]

    async def ping(self, timeout: float = 5.0) -> float | None:
        """Session round trip in seconds (None in one-shot mode or without a session)."""
        if self._session is None or not self._session.alive:
            return None
        return await self._session.ping(timeout)
