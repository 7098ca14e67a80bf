"""The farm's live state for ``GET /v1/devices/events`` (and the console's farm view).

:class:`DeviceWatch` is built in the app's lifespan over the backend. It builds *snapshots* (every
phone's ``PhoneHealth`` plus what only a watcher over time can tell, and the queue of each model)
when something changes, and hands the newest one to every subscriber::

    {"object": "devices.snapshot", "seq": 12, "time": 1767225600.25,
     "data": [{...PhoneHealth fields..., "live_tps": 21.9, "tps_history": [22.1, 21.8],
               "last_error_at": 1767225590.0}],
     "queues": [{"model": "qwen3.5-0.8b", "waiting": 2, "oldest_wait_s": 0.8, "phones": 2,
                 "serving": 2}]}

When it refreshes: on every change the pool announces (``PhonePool.watch``: a phone's state, a request
queued, granted or handed back), coalesced to at most one refresh per ``MIN_INTERVAL_S``, and, while
someone subscribes, every ``tick_s`` (for what moves without an announcement: the tokens of the
request in flight, a waiter that gave up). A snapshot goes out only when it differs from the last one
in more than the clocks that run by themselves (``uptime_s``, ``retry_in_s``, ``oldest_wait_s``,
``telemetry_age_s``: clients count those on from the snapshot's ``time``).

What it adds to a phone's health:

* ``live_tps``: tokens per second of the request in flight since its first token, over
  ``LIVE_WINDOW_S`` at most (from ``tokens_served``; None when idle or not measured yet);
* ``tps_history``: the decode rate (``last_decode_tps``) of its last ``history`` requests, oldest first;
* ``last_error_at``: when ``last_error`` took its value (unix time; None: before this server saw it).

A subscriber holds at most one pending snapshot (a slow reader skips to the newest, memory stays
bounded whatever it does).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from server.backends.base import Backend, PhoneHealth

logger = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.1  # at most this many refreshes a second from announcements (a loaded pool announces often)
COALESCE_S = 0.02  # an announcement is acted on this late, so that a burst of them makes one refresh
# the live rate is over the last LIVE_WINDOW_S of the request (most requests: all of it since its first
# token): tokens reach the host in bursts when it is busy, and a short window would count a burst as speed
LIVE_WINDOW_S = 10.0
LIVE_MIN_SPAN_S = 0.5  # a live rate needs samples this far apart
# fields that change by themselves while nothing happens: not a reason to send a snapshot
VOLATILE = frozenset({"uptime_s", "retry_in_s", "oldest_wait_s", "live_tps", "telemetry_age_s"})


@runtime_checkable
class Watchable(Protocol):
    """A backend that announces its changes (``server.scheduling.pool.PhonePool``)."""

    def watch(self, listener: Callable[[], None]) -> Callable[[], None]: ...


@runtime_checkable
class Queues(Protocol):
    """A backend with per-model queues (``server.scheduling.pool.PhonePool``)."""

    def queue_depth(self, model: str | None = None) -> int: ...

    def queue_wait_s(self, model: str) -> float: ...


def phone_json(h: PhoneHealth) -> dict[str, Any]:
    """A phone's health as JSON (as ``/v1/devices`` shows it)."""
    out = dataclasses.asdict(h)
    out["state"] = h.state.value
    return out


@dataclass
class _Track:
    """What the watch remembers of one phone between snapshots."""

    request: str | None = None  # the request in flight at the last refresh
    tokens_at_request: int = 0  # tokens_served when that request was first seen
    samples: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)  # (t, tokens)
    history: collections.deque[float] = field(default_factory=collections.deque)
    error: str | None = None
    error_at: float | None = None


@dataclass(eq=False)
class _Subscriber:
    pending: dict[str, Any] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class DeviceWatch:
    """Snapshots of the farm for any number of subscribers (see the module docstring)."""

    def __init__(self, backend: Backend, *, tick_s: float = 0.5, history: int = 40) -> None:
        self._backend = backend
        self._tick_s = tick_s
        self._history = history
        self._tracks: dict[str, _Track] = {}
        self._subs: set[_Subscriber] = set()
        self._current: dict[str, Any] | None = None
        self._key: str | None = None
        self._seq = 0
        self._last_refresh = 0.0
        self._scheduled: asyncio.TimerHandle | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._unwatch: Callable[[], None] | None = None
        self._closed = False
        self._encoded: tuple[dict[str, Any], bytes] | None = None  # the last snapshot encoded, and its JSON

    def start(self) -> None:
        """Listens to the backend's announcements (when it makes any) and takes the first snapshot."""
        if isinstance(self._backend, Watchable):
            self._unwatch = self._backend.watch(self._announced)
        self.refresh()

    async def aclose(self) -> None:
        self._closed = True
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._scheduled is not None:
            self._scheduled.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        for sub in self._subs:
            sub.wake.set()

    # -- refreshing ---------------------------------------------------------------------------

    def _announced(self) -> None:
        """The pool changed: refresh soon (once for a burst), at most every ``MIN_INTERVAL_S``."""
        if self._scheduled is not None or self._closed:
            return
        delay = max(COALESCE_S, self._last_refresh + MIN_INTERVAL_S - time.monotonic())
        self._scheduled = asyncio.get_running_loop().call_later(delay, self._scheduled_refresh)

    def _scheduled_refresh(self) -> None:
        self._scheduled = None
        self.refresh()

    def refresh(self) -> dict[str, Any]:
        """Takes a snapshot now; sends it to the subscribers when it differs from the last one."""
        self._last_refresh = now = time.monotonic()
        try:
            snapshot = self._snapshot(now)
        except Exception:  # a watcher must never break the pool that called it
            logger.exception("device snapshot failed")
            return self._current or {}
        key = json.dumps(_stable(snapshot), sort_keys=True, default=str)
        if key != self._key or self._current is None:
            self._seq += 1
            self._key = key
            snapshot["seq"] = self._seq
            self._current = snapshot
            for sub in self._subs:
                sub.pending = snapshot
                sub.wake.set()
        else:  # the same, but with the clocks as they are now for whoever joins next
            self._current = {**snapshot, "seq": self._seq}
        return self._current

    def _snapshot(self, now: float) -> dict[str, Any]:
        phones = [self._phone(h, now) for h in self._backend.health()]
        return {"object": "devices.snapshot", "seq": self._seq, "time": time.time(), "data": phones,
                "queues": self._queues(phones)}

    def _phone(self, h: PhoneHealth, now: float) -> dict[str, Any]:
        out = phone_json(h)
        key = f"{h.adb_server}/{h.serial}"
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track(history=collections.deque(maxlen=self._history))
        if h.last_error != track.error:
            track.error, track.error_at = h.last_error, time.time() if h.last_error is not None else None
        if h.request_in_flight != track.request:
            if track.request is not None and h.tokens_served > track.tokens_at_request and h.last_decode_tps:
                track.history.append(round(h.last_decode_tps, 2))  # the request before ended
            track.request, track.tokens_at_request = h.request_in_flight, h.tokens_served
            track.samples.clear()
        live = None
        if h.request_in_flight is not None and h.tokens_served > track.tokens_at_request:
            samples = track.samples  # from its first token on: the prompt's time is not decoding
            samples.append((now, h.tokens_served))
            while len(samples) > 2 and now - samples[1][0] >= LIVE_WINDOW_S:
                samples.popleft()
            (t0, n0), (t1, n1) = samples[0], samples[-1]
            if t1 - t0 >= LIVE_MIN_SPAN_S:
                live = round((n1 - n0) / (t1 - t0), 2)
        out.update(live_tps=live, tps_history=list(track.history), last_error_at=track.error_at)
        return out

    def _queues(self, phones: list[dict[str, Any]]) -> list[dict[str, Any]]:
        backend = self._backend
        queues = backend if isinstance(backend, Queues) else None
        out = []
        for name in [m.name for m in backend.models()]:
            of_model = [p for p in phones if p.get("model") == name]
            out.append({
                "model": name,
                "waiting": queues.queue_depth(name) if queues else 0,
                "oldest_wait_s": round(queues.queue_wait_s(name), 3) if queues else 0.0,
                "phones": len(of_model),
                "serving": sum(p["state"] in ("ready", "busy") for p in of_model),
            })
        return out

    # -- subscribing --------------------------------------------------------------------------

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    @property
    def tick_s(self) -> float:
        return self._tick_s

    def encode(self, snapshot: dict[str, Any]) -> bytes:
        """The snapshot as JSON, made once however many subscribers send it."""
        cached = self._encoded
        if cached is not None and cached[0] is snapshot:
            return cached[1]
        payload = json.dumps(snapshot, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")
        self._encoded = (snapshot, payload)
        return payload

    async def snapshots(self, *, until: Callable[[], bool] | None = None) -> AsyncIterator[dict[str, Any]]:
        """The current snapshot at once, then each new one (skipping to the newest when the reader is
        slower than the changes), until the watch closes or ``until()`` holds (checked at least every
        ``tick_s``: the server shutting down ends a watch at once, it has nothing in flight)."""
        sub = _Subscriber()
        self._subs.add(sub)
        self._ensure_ticking()
        try:
            yield self.refresh()
            sub.pending = None
            while not self._closed:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._tick_s):
                        await sub.wake.wait()
                if until is not None and until():
                    return
                sub.wake.clear()
                snapshot, sub.pending = sub.pending, None
                if snapshot is not None and not self._closed:
                    yield snapshot
        finally:
            self._subs.discard(sub)

    def _ensure_ticking(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="qhx-device-watch")

    async def _tick(self) -> None:
        while self._subs and not self._closed:
            await asyncio.sleep(self._tick_s)
            self.refresh()


def _stable(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The snapshot without what changes by itself (see ``VOLATILE``)."""
    return {
        "data": [{k: v for k, v in p.items() if k not in VOLATILE} for p in snapshot["data"]],
        "queues": [{k: v for k, v in q.items() if k not in VOLATILE} for q in snapshot["queues"]],
    }
