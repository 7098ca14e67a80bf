"""The simulated phone's body: its temperature and battery, as decode work heats and drains it.

Two kinds of process share it through ``<sandbox>/health.json``: the runtime, which works (a request
being processed counts as full load) and slows its decoding down as the phone throttles, and the
simulated ``dumpsys`` (server/sim/dumpsys.py), which reports it in Android's format. The file holds
the values at one instant; everyone computes the present from there (:func:`advance`), and writers
(read, advance, change, write) hold ``<sandbox>/.health.lock``.

Model (all knobs in sim.json, server/sim/simconfig.py; time is simulated time, real seconds times
``speed``, so ``speed: 0`` freezes the body where it is):

* temperature relaxes exponentially, with time constant ``thermal_tau_s``, towards ``ambient_c``
  while idle and ``ambient_c + thermal_rise_c`` while working (Newton's law of cooling with a heat
  source): a phone that works for good settles ``thermal_rise_c`` above the room;
* the thermal status (Android's 0-6) is the number of thresholds of ``thermal_status_c`` (LIGHT ..
  SHUTDOWN) the temperature has reached;
* decoding slows by the factor of ``throttle_curve`` at the current temperature (points
  ``[celsius, factor]``, linear between them, flat beyond the ends);
* the battery drains ``battery_drain_pct_per_min`` under load (a tenth of it idle) and gains
  ``battery_charge_pct_per_min`` while ``charging``; it stays within 0-100 %.

Work is a lease: the runtime renews it while it processes a request (:class:`Work`), and it ends by
itself ``LEASE_S`` after the last renewal, so a runtime that crashed mid-request stops heating.
``temp_c`` / ``battery_pct`` (sim knobs that are *events*, applied once when written and not kept
in sim.json: :meth:`PhoneBody.set`) put the body in a given state, after which the model takes over.

Imports stay light (no dataclasses, no simconfig at import time): the simulated ``dumpsys`` starts a
process per call, and reads the knobs it needs with :func:`read_knobs`.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, Self

if TYPE_CHECKING:
    from server.sim.simconfig import SimConfigWatcher

SIM_JSON = "sim.json"  # server.sim.simconfig.SIM_JSON (not imported: see the module docstring)
HEALTH_JSON = "health.json"
LOCK_FILE = ".health.lock"
LEASE_S = 2.0  # work counts as going on until this long (real seconds) after its last renewal
RENEW_S = 0.5  # the runtime renews its lease (and reads the throttle) this often while it works
IDLE_DRAIN = 0.1  # an idle phone drains this share of the battery it drains under load
STATUS_NAMES = ("NONE", "LIGHT", "MODERATE", "SEVERE", "CRITICAL", "EMERGENCY", "SHUTDOWN")
EVENT_KNOBS = ("temp_c", "battery_pct")  # knobs that set the body once (see the module docstring)
# the knobs the body reads, with their defaults; server.sim.simconfig.DEFAULTS takes them from here, so
# that the simulated dumpsys can read sim.json without importing simconfig
KNOB_DEFAULTS: dict[str, Any] = {
    "speed": 1.0,
    "ambient_c": 25.0,
    "thermal_rise_c": 15.0,
    "thermal_tau_s": 300.0,
    "thermal_status_c": [38.0, 41.0, 44.0, 47.0, 50.0, 53.0],
    "throttle_curve": [[42.0, 1.0], [44.0, 0.55], [47.0, 0.35], [53.0, 0.15]],
    "charging": True,
    "battery_drain_pct_per_min": 0.5,
    "battery_charge_pct_per_min": 1.0,
}


class Knobs(Protocol):
    """What the body reads of the sim knobs (``SimConfig`` has it all; so does :func:`read_knobs`)."""

    @property
    def speed(self) -> float: ...
    @property
    def ambient_c(self) -> float: ...
    @property
    def thermal_rise_c(self) -> float: ...
    @property
    def thermal_tau_s(self) -> float: ...
    @property
    def thermal_status_c(self) -> tuple[float, ...]: ...
    @property
    def throttle_curve(self) -> tuple[tuple[float, float], ...]: ...
    @property
    def charging(self) -> bool: ...
    @property
    def battery_drain_pct_per_min(self) -> float: ...
    @property
    def battery_charge_pct_per_min(self) -> float: ...


def read_knobs(path: Path) -> Knobs:
    """The body's knobs from a sim.json (written and checked by server.sim.simconfig), cheaply; the
    defaults where the file is missing or unreadable."""
    values = dict(KNOB_DEFAULTS)
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        data = json.loads(path.read_text(encoding="utf-8"))
        values.update({k: data[k] for k in KNOB_DEFAULTS if k in data})
    if values["speed"] == "max":
        values["speed"] = 0.0
    try:
        values["thermal_status_c"] = tuple(float(t) for t in values["thermal_status_c"])
        values["throttle_curve"] = tuple(sorted((float(t), float(f)) for t, f in values["throttle_curve"]))
        for name in ("speed", "ambient_c", "thermal_rise_c", "thermal_tau_s", "battery_drain_pct_per_min",
                     "battery_charge_pct_per_min"):
            values[name] = float(values[name])
    except (TypeError, ValueError):
        return read_knobs(Path("/nonexistent"))  # a hand-edited file gone wrong: the defaults
    return SimpleNamespace(**values)  # type: ignore[return-value]


class Body(NamedTuple):
    """The phone's physical state at wall-clock time ``t``."""

    t: float  # time.time()
    temp_c: float
    battery_pct: float
    working_until: float = 0.0  # time.time() the work lease runs to (in the past: idle)
    # what `dumpsys battery set/unplug` made the phone report (cleared by `dumpsys battery reset`)
    battery_override: dict[str, int] | None = None

    def working(self, now: float) -> bool:
        return self.working_until > now


def fresh(cfg: Knobs, now: float) -> Body:
    """A phone that has rested in the room: at ambient temperature, its battery full."""
    return Body(now, cfg.ambient_c, 100.0)


def advance(body: Body, cfg: Knobs, now: float) -> Body:
    """The body at ``now``: working until the lease ends (or ``now``), idle after."""
    if now <= body.t:
        return body
    temp, battery, t = body.temp_c, body.battery_pct, body.t
    for end, load in ((min(now, max(t, body.working_until)), 1.0), (now, 0.0)):
        if end > t:
            temp, battery = _evolve(temp, battery, load, (end - t) * max(cfg.speed, 0.0), cfg)
            t = end
    return body._replace(t=now, temp_c=temp, battery_pct=battery)


def _evolve(temp: float, battery: float, load: float, dt: float, cfg: Knobs) -> tuple[float, float]:
    target = cfg.ambient_c + load * cfg.thermal_rise_c
    temp = target + (temp - target) * math.exp(-dt / cfg.thermal_tau_s) if cfg.thermal_tau_s > 0 else target
    per_min = (cfg.battery_charge_pct_per_min if cfg.charging else 0.0) - cfg.battery_drain_pct_per_min * (
        IDLE_DRAIN + (1 - IDLE_DRAIN) * load)
    return temp, min(100.0, max(0.0, battery + per_min * dt / 60.0))


def thermal_status(temp_c: float, cfg: Knobs) -> int:
    """Android's thermal status (0 NONE .. 6 SHUTDOWN) at this temperature."""
    return sum(1 for threshold in cfg.thermal_status_c[:6] if temp_c >= threshold)


def throttle(temp_c: float, cfg: Knobs) -> float:
    """The share of its cold decode rate the phone keeps at this temperature (0 < factor <= 1)."""
    curve = sorted(cfg.throttle_curve)
    if not curve:
        return 1.0
    if temp_c <= curve[0][0]:
        factor = curve[0][1]
    elif temp_c >= curve[-1][0]:
        factor = curve[-1][1]
    else:
        factor = curve[-1][1]
        for (t0, f0), (t1, f1) in itertools.pairwise(curve):
            if t0 <= temp_c <= t1:
                factor = f0 if t1 == t0 else f0 + (f1 - f0) * (temp_c - t0) / (t1 - t0)
                break
    return min(1.0, max(0.01, factor))


class PhoneBody:
    """``<sandbox>/health.json``: read the present, or change it under the lock. The knobs come from
    ``watcher`` (the runtime's, re-reading sim.json when it changes), else from :func:`read_knobs`."""

    def __init__(self, sandbox: Path, watcher: SimConfigWatcher | None = None) -> None:
        self.sandbox = Path(sandbox)
        self._path = self.sandbox / HEALTH_JSON
        self._watcher = watcher

    @property
    def config(self) -> Knobs:
        if self._watcher is not None:
            return self._watcher.current()
        return read_knobs(self.sandbox / SIM_JSON)

    def now(self) -> Body:
        """The body as of now (nothing written)."""
        cfg, now = self.config, time.time()
        return advance(self._load(cfg, now), cfg, now)

    def update(self, change: Callable[[Body], Body]) -> Body:
        """Advance to now, apply ``change``, write; returns the new body."""
        with self._locked():
            cfg, now = self.config, time.time()
            body = change(advance(self._load(cfg, now), cfg, now))
            self._store(body)
            return body

    def set(self, *, temp_c: float | None = None, battery_pct: float | None = None) -> Body:
        """Put the body in this state now (the ``temp_c`` / ``battery_pct`` knobs)."""
        changes: dict[str, Any] = {}
        if temp_c is not None:
            changes["temp_c"] = float(temp_c)
        if battery_pct is not None:
            changes["battery_pct"] = min(100.0, max(0.0, float(battery_pct)))
        return self.update(lambda body: body._replace(**changes))

    def _load(self, cfg: Knobs, now: float) -> Body:
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            return Body(float(data["t"]), float(data["temp_c"]), float(data["battery_pct"]),
                        float(data.get("working_until", 0.0)),
                        {str(k): int(v) for k, v in dict(data.get("battery_override") or {}).items()})
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return fresh(cfg, now)  # none yet (or unreadable): a rested phone

    def _store(self, body: Body) -> None:
        tmp = self.sandbox / f".health.{os.getpid()}.{threading.get_ident()}.json"
        try:
            tmp.write_text(json.dumps(body._asdict()), encoding="utf-8")
            os.replace(tmp, self._path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.sandbox / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


class Work:
    """One request's work on the phone (a context manager): holds the work lease, renewing it every
    ``RENEW_S``, and says how much longer each decode step takes at the current temperature."""

    def __init__(self, body: PhoneBody | None) -> None:
        self._body = body
        self._factor = 1.0
        self._renewed = -math.inf  # time.monotonic()

    def __enter__(self) -> Self:
        self._renew()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._body is not None:
            now = time.time()
            self._body.update(lambda body: body._replace(working_until=min(body.working_until, now)))

    def slowdown_s(self, step_s: float) -> float:
        """Extra seconds one decode step of ``step_s`` takes now (0 on a cool phone)."""
        if self._body is None:
            return 0.0
        if time.monotonic() - self._renewed >= RENEW_S:
            self._renew()
        return step_s * (1.0 / self._factor - 1.0)

    def _renew(self) -> None:
        self._renewed = time.monotonic()
        if self._body is None:
            return
        until = time.time() + LEASE_S
        body = self._body.update(lambda b: b._replace(working_until=max(b.working_until, until)))
        self._factor = throttle(body.temp_c, self._body.config)
