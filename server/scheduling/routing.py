"""Routing: which phone a queued request gets. The pool (server/scheduling/pool.py) keeps the queue
mechanics (FIFO per model, bounds, timeouts, leases, retries) and asks a :class:`Router` for each
waiting request, oldest first, whenever a phone may have become free.

A router sees a read-only picture: the request (:class:`RouteRequest`) and the phones serving its
model (:class:`PhoneView`, one per phone that is ready or busy, free or not), and names a free one or
none. ``None`` leaves the request queued; the pool asks again on the next change (a phone handed back,
a phone's state changed, a new request). A router holds no state of its own about phones or requests:
what it decides from belongs in the views, so that a policy is tested by building views.

Policies to come add fields here, not new arguments: what a phone holds (its live state's token ids
and checkpoint slots) for prefix-aware routing, its telemetry (thermal status) for thermal-aware
routing. The request already carries its prompt ids for the first of those.

:class:`IdleLongest` is today's policy (docs/pool.md, "Scheduling").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.backends.base import PhoneState


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """A request waiting for a phone, as a router sees it."""

    request_id: str
    model: str
    avoid: frozenset[str]  # phones (keys) that failed this request
    enqueued: float  # time.monotonic() when it joined the queue (a retry: when it joined it again)
    prompt_ids: Sequence[int] = ()  # for prefix-aware policies; never modified


@dataclass(frozen=True, slots=True)
class PhoneView:
    """One phone serving the request's model, as a router sees it."""

    key: str  # "<adb server>/<serial>", as the pool and /v1/devices name it
    state: PhoneState  # READY or BUSY
    leased: bool  # held by a request (running on it, or granted to one about to run)
    idle_since: float  # time.monotonic() when a request last handed it back; 0.0 if none ever did

    @property
    def free(self) -> bool:
        """Ready and held by nobody: the only phones a router may name."""
        return self.state is PhoneState.READY and not self.leased


class Router(Protocol):
    """Chooses a phone for a request. ``phones`` are the phones that serve the request's model (ready
    or busy), in the pool's order; the answer is the key of one whose ``free`` is true, or ``None`` to
    leave the request waiting. Called on the event loop, often: it must not block or await."""

    def choose(self, request: RouteRequest, phones: Sequence[PhoneView]) -> str | None: ...


class IdleLongest:
    """Today's policy: of the free phones the request may use, the one idle longest, so that load
    spreads over all phones. A phone that failed this request is avoided while another phone serves
    the model (busy or not: the request rather waits for that one); when every phone serving the
    model failed it, any of them will do (with one phone, the retry goes to that phone once it is
    back)."""

    def choose(self, request: RouteRequest, phones: Sequence[PhoneView]) -> str | None:
        usable = [p for p in phones if p.free and _may_use(request, p, phones)]
        if not usable:
            return None
        return min(usable, key=lambda p: p.idle_since).key  # the first of equals: the pool's order breaks ties


def _may_use(request: RouteRequest, phone: PhoneView, phones: Sequence[PhoneView]) -> bool:
    return phone.key not in request.avoid or all(p.key in request.avoid for p in phones)
