"""The phone seam: what runs requests on one phone, behind one interface.

A :class:`Runtime` is ``qhx_generate`` on one phone as the host drives it. Two implementations:

* :class:`~server.backends.adb.session.Session`: one long-lived process speaking session protocol v1
  (device-protocol.md section 3); token ids in and out.
* :class:`~server.backends.adb.oneshot.OneShot`: the one-shot CLI, one process per request
  (device-protocol.md section 2); it takes text and prints text, and turns both into token ids
  below the backend contract, so that the contract carries token ids and timings only.

:class:`~server.backends.adb.phone.Phone` holds one runtime and never asks which kind it is: it
admits a request, runs ``runtime.generate(params)``, and owns the phone's state (busy, idle, the
request in flight). Its supervisor starts a runtime (:class:`~server.backends.adb.launcher.Launcher`),
serves until ``wait_closed()`` returns, and starts another.

The rules every runtime keeps (tests/backends/adb/test_runtime_seam.py runs the same tests on both):

* ``generate`` yields ``Started``, ``Tokens``..., ``Finished`` (the backend contract) and raises a
  :class:`~server.errors.BackendError` on failure; when it yields ``Finished`` it is ready for the
  next request. A consumer that leaves early (``aclose()``, cancellation) stops the request on the
  phone; what is still winding down then is ``settling``.
* A phone fault (PhoneLost, PhoneStalled, ProtocolViolation) may end the runtime (``alive`` turns
  false and ``wait_closed()`` returns why); a runtime that outlives a fault (one process per
  request) leaves counting it to the phone.
* ``close()`` stops it gracefully (bounded), ``abort(reason)`` at once; a request in flight then
  fails with PhoneLost.
* ``params.prompt_ids`` is the whole prompt; what a runtime still holds of it from earlier requests
  (state reuse: ``reusable``, ``holding``) is its own business. A session reuses its process's state;
  one-shot processes hold nothing (``Started.cached_tokens`` 0).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import ClassVar, Literal

from server.backends.adb.reuse import Holding
from server.backends.base import Event, GenerationParams

RuntimeKind = Literal["session", "oneshot"]


class Runtime(abc.ABC):
    """``qhx_generate`` on one phone, as the host drives it (see the module docstring)."""

    kind: ClassVar[RuntimeKind]  # what a phone's health calls its ``mode``
    serial: str

    @property
    @abc.abstractmethod
    def alive(self) -> bool:
        """False once the runtime ended (closed, aborted, its process gone): it serves no more."""

    @property
    def settling(self) -> asyncio.Task[None] | None:
        """The wind-down of a request whose consumer left while the phone was still finishing it
        (a task that ends when the phone let go); None when nothing is winding down."""
        return None

    @abc.abstractmethod
    def generate(self, params: GenerationParams) -> AsyncIterator[Event]:
        """Run one request: Started, Tokens..., Finished; raises BackendError on failure."""

    @abc.abstractmethod
    async def cancel(self, request_id: str) -> None:
        """Stop this request on the phone (no-op if it is not the one running); the generator then
        ends with ``Finished(reason="cancelled")``."""

    @abc.abstractmethod
    async def wait_closed(self) -> str:
        """Wait until the runtime ended; why it ended."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop gracefully (bounded by ``cancel_timeout_s``), then for good."""

    @abc.abstractmethod
    def abort(self, reason: str) -> None:
        """Stop now (closing the adb stream kills the process); whoever waits on it fails."""

    async def ping(self, timeout: float = 5.0) -> float | None:
        """Round trip to the running process in seconds; None when there is no process to ask."""
        return None

    def reusable(self, prompt_ids: Sequence[int]) -> int:
        """Prompt tokens a request for ``prompt_ids`` would not process again if it ran now (state
        reuse, reuse.py); 0 for a runtime that keeps no state between requests."""
        return 0

    def holding(self) -> Holding:
        """What the process holds (its live state, checkpoint slots), for the phone's health."""
        return Holding()
