"""An in-process double of ONE phone, for unit tests of the serving engine only.

This is not the simulated phone (server/sim, reached through a real adb server: the API tests use
that). It is the smallest faithful implementation of the ``Backend`` contract (server/backends/
base.py) that lets engine tests script exact token sequences, timing and failures:

* events in order ``Started -> Tokens* -> Finished``; the stop id itself is not sent as a token;
* ``Finished.reason`` is ``stop`` on a stop id, ``length`` at ``max_new``;
* closing the iterator early (or cancelling the consuming task) "sends cancel" and waits a little
  for the phone's ``done`` before returning, as the real phone session does;
* failures are raised as ``BackendError`` subclasses;
* ``Started.cached_tokens`` is what ``cached_tokens`` says (a number, or a function of the request),
  as a phone that still held part of the prompt says it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from server.backends.base import (
    Backend,
    Event,
    Finished,
    GenerationParams,
    ModelInfo,
    PhoneHealth,
    PhoneState,
    Started,
    Tokens,
)


class InProcessPhoneDouble(Backend):
    def __init__(
        self,
        ids: list[int],
        *,
        delay_s: float = 0.0,
        done_after_cancel_s: float = 0.02,
        fail_after: int | None = None,
        error: Exception | None = None,
        admission_error: Exception | None = None,
        done_reason: str | None = None,
        skip_done: bool = False,
        cached_tokens: int | Callable[[GenerationParams], int] = 0,
    ) -> None:
        self.ids = ids
        self.delay_s = delay_s
        self.done_after_cancel_s = done_after_cancel_s
        self.fail_after = fail_after
        self.error = error
        self.admission_error = admission_error
        self.done_reason = done_reason
        self.skip_done = skip_done
        self.cached_tokens = cached_tokens
        self.params: list[GenerationParams] = []  # every request it was given, in order
        self.cancelled: list[str] = []  # request ids the phone was told to cancel
        self.cancel_confirmed: list[str] = []  # ... and confirmed `done` for
        self.busy_with: str | None = None
        self.sent = 0

    async def generate(self, params: GenerationParams) -> AsyncIterator[Event]:  # type: ignore[override]
        if self.admission_error is not None:
            raise self.admission_error
        rid = params.request_id
        self.params.append(params)
        self.busy_with = rid
        cached = self.cached_tokens(params) if callable(self.cached_tokens) else self.cached_tokens
        finished = False
        mine = 0  # this request's tokens (``self.sent`` counts every request's)
        try:
            yield Started(rid, len(params.prompt_ids), 0, "double-1", cached)
            reason = "length"
            for k, out in enumerate(self.ids[: params.max_new]):
                if self.fail_after is not None and k == self.fail_after:
                    assert self.error is not None
                    raise self.error
                if out in params.stop_ids:
                    reason = "stop"
                    break
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                t_ms = asyncio.get_running_loop().time() * 1000
                self.sent += 1
                mine += 1
                yield Tokens(rid, [out], t_ms)
            finished = True
            if self.skip_done:
                return
            yield Finished(rid, self.done_reason or reason, len(params.prompt_ids), mine, 1.0, 2.0)  # type: ignore[arg-type]
        finally:
            if not finished:
                self.cancelled.append(rid)
                await asyncio.sleep(self.done_after_cancel_s)  # waiting for the phone's `done`
                self.cancel_confirmed.append(rid)
            self.busy_with = None

    async def cancel(self, request_id: str) -> None:
        return None

    def models(self) -> list[ModelInfo]:
        return []

    def health(self) -> list[PhoneHealth]:
        return [PhoneHealth("double-1", "in-process", PhoneState.BUSY if self.busy_with else PhoneState.READY)]

    async def aclose(self) -> None:
        return None
