"""Per-phone simulator knobs: ``<sandbox>/sim.json``, re-read by the runtime when it changes.

Every knob, its default and its meaning (docs/simulator.md says the same, with examples):

timing (read at the start of each request; all simulated durations are divided by ``speed``)
  ``load_s`` 1.5             model load time, paid once per process (real tokenizer loading included)
  ``speed`` 1.0              time divisor; ``0`` or ``"max"``: no sleeps at all
  ``decode_tps`` null        decode tokens/s; null = by the bundle precision (fp16 22.7, w8 24.2)
  ``prefill_factor`` 0.7     cost of one prompt token as a fraction of one decode step
  ``checkpoint_ms`` 5        cost of one checkpoint ``save`` or ``restore`` (v1.1), in simulated ms

text (read at the start of each request)
  ``stop_rate`` 0.02         per-token chance of ending the answer (once ``min_tokens`` are out);
                             the end is a stop id, only when the request has stop ids
  ``min_tokens`` 8           no natural end before this many answer tokens
  ``think`` null             true: always reason first; false: never; null: when the prompt opens
                             ``<think>`` (Qwen generation prompt with thinking on)
  ``tool_call`` null         true: always emit a tool call; false: never; null: when the prompt has
                             ``<tools>`` and its last user turn is not a ``<tool_response>``
  ``answer`` null            a string: the answer is this text, verbatim (then the end of turn when
                             the request has stop ids, else generated sentences), e.g. to test how
                             clients show markup from a model

session (read once, when a session process starts)
  ``checkpoints`` 4          checkpoint slots advertised in ``ready`` (session protocol v1.1);
                             0: a v1 runtime (no ``checkpoints`` in ``ready``, ``restore``/``save``
                             ignored as unknown fields)

faults (checked at request start and before every token)
  ``crash_after`` null       int N: the process exits abruptly (code 134) after N tokens of a request
  ``hang`` false             true: tokens stop coming (process alive, pings answered, cancel ignored)
                             until the knob is cleared
  ``garbage`` false          true: one non-JSON line on stdout before each request's first ``tok``
  ``slow_first_token_s`` 0   extra delay before each request's first token, in real seconds
                             (not divided by ``speed``, so stall timeouts can be tested at speed 0)
  ``no_session`` false       true: the runtime knows only the one-shot CLI; ``-`` is a prompt

physics (the phone's temperature and battery, server/sim/physics.py; read as they are needed)
  ``ambient_c`` 25           the room's temperature (Celsius)
  ``thermal_rise_c`` 15      how far above the room continuous decoding settles the phone
  ``thermal_tau_s`` 300      thermal time constant, simulated seconds (real seconds times ``speed``)
  ``thermal_status_c``       temperatures of Android's thermal status LIGHT .. SHUTDOWN
                             (default [38, 41, 44, 47, 50, 53])
  ``throttle_curve``         [celsius, decode rate factor] points, linear between them, flat beyond
                             (default [[42, 1.0], [44, 0.55], [47, 0.35], [53, 0.15]])
  ``charging`` true          on a charger: the battery gains ``battery_charge_pct_per_min``
  ``battery_drain_pct_per_min`` 0.5   battery used per minute under load (a tenth of it idle)
  ``battery_charge_pct_per_min`` 1.0  battery gained per minute on a charger
  ``temp_c``, ``battery_pct``  events, not kept in sim.json: writing one puts the phone at that
                             temperature / battery level now (a phone that starts hot, a low battery)

Fault knobs are level-triggered: they apply to every request while set (a crashed session that is
restarted crashes again until the knob is cleared). Writers should replace the file atomically
(:func:`write_sim_config` does); a half-written file is ignored and the previous knobs are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from server.sim.physics import EVENT_KNOBS, KNOB_DEFAULTS

SIM_JSON = "sim.json"
DECODE_TPS = {"fp16": 22.7, "w8": 24.2}  # model card, SM8850
RECENT_NS = 2_000_000_000

DEFAULTS: dict[str, Any] = {
    "load_s": 1.5,
    "speed": 1.0,
    "decode_tps": None,
    "prefill_factor": 0.7,
    "checkpoint_ms": 5.0,
    "checkpoints": 4,
    "stop_rate": 0.02,
    "min_tokens": 8,
    "think": None,
    "tool_call": None,
    "answer": None,
    "crash_after": None,
    "hang": False,
    "garbage": False,
    "slow_first_token_s": 0.0,
    "no_session": False,
    # the phone's body (thermal model, battery): physics.py owns their defaults, which the simulated
    # dumpsys reads without importing this module
    **{k: v for k, v in KNOB_DEFAULTS.items() if k != "speed"},
}


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Typed view of sim.json (see the module docstring for every knob)."""

    load_s: float = 1.5
    speed: float = 1.0  # 0 = as fast as possible
    decode_tps: float | None = None
    prefill_factor: float = 0.7
    checkpoint_ms: float = 5.0
    checkpoints: int = 4
    stop_rate: float = 0.02
    min_tokens: int = 8
    think: bool | None = None
    tool_call: bool | None = None
    answer: str | None = None
    crash_after: int | None = None
    hang: bool = False
    garbage: bool = False
    slow_first_token_s: float = 0.0
    no_session: bool = False
    ambient_c: float = 25.0
    thermal_rise_c: float = 15.0
    thermal_tau_s: float = 300.0
    thermal_status_c: tuple[float, ...] = (38.0, 41.0, 44.0, 47.0, 50.0, 53.0)
    throttle_curve: tuple[tuple[float, float], ...] = ((42.0, 1.0), (44.0, 0.55), (47.0, 0.35), (53.0, 0.15))
    charging: bool = True
    battery_drain_pct_per_min: float = 0.5
    battery_charge_pct_per_min: float = 1.0

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SimConfig:
        """Build from a sim.json object; unknown keys are ignored, ``speed: "max"`` means 0.

        Raises ``ValueError`` (``TypeError`` for a non-object) on bad values, so that a bad edit is ignored (the
        watcher keeps the previous knobs) instead of failing inside a request.
        """
        if not isinstance(data, Mapping):
            raise TypeError("sim.json must hold a JSON object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            if f.name == "speed" and value == "max":
                value = 0.0
            if f.name in _LIST_KNOBS:
                values[f.name] = _LIST_KNOBS[f.name](value)
                continue
            values[f.name] = _check(f.name, value, f.type)
        return cls(**values)

    def scale(self, seconds: float) -> float:
        """A simulated duration in real seconds (0 when running as fast as possible)."""
        if self.speed <= 0:
            return 0.0
        return seconds / self.speed

    def decode_step_s(self, precision: str) -> float:
        """Real seconds per decoded token for a bundle of this precision."""
        tps = self.decode_tps or DECODE_TPS.get(precision, DECODE_TPS["fp16"])
        return self.scale(1.0 / tps)

    def checkpoint_s(self) -> float:
        """Real seconds one checkpoint ``save`` or ``restore`` takes."""
        return self.scale(self.checkpoint_ms / 1000.0)


def _check(name: str, value: Any, annotation: Any) -> Any:
    """Validate one knob against its annotation (a string, as ``from __future__`` leaves it)."""
    kind = str(annotation)
    if value is None:
        if "None" not in kind:
            raise ValueError(f"sim knob {name} cannot be null")
        return None
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ValueError(f"sim knob {name} must be true or false")
        return value
    if kind.startswith("str"):
        if not isinstance(value, str):
            raise ValueError(f"sim knob {name} must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"sim knob {name} must be a number >= 0")
    return int(value) if kind.startswith("int") else float(value)


def _temperatures(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) > 6 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise ValueError("sim knob thermal_status_c must be a list of at most 6 temperatures")
    if list(value) != sorted(value):
        raise ValueError("sim knob thermal_status_c must not decrease")
    return tuple(float(v) for v in value)


def _curve(value: Any) -> tuple[tuple[float, float], ...]:
    points = []
    for point in value if isinstance(value, list) else [None]:
        if (not isinstance(point, list) or len(point) != 2
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in point)
                or not 0 < point[1] <= 1):
            raise ValueError("sim knob throttle_curve must be a list of [celsius, factor] with 0 < factor <= 1")
        points.append((float(point[0]), float(point[1])))
    return tuple(sorted(points))


_LIST_KNOBS = {"thermal_status_c": _temperatures, "throttle_curve": _curve}


class SimConfigWatcher:
    """Reads sim.json and re-reads it only when the file changes (one ``stat`` per check)."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._key: tuple[int, int, int] | None = None
        self._config = SimConfig()
        self.current()

    def current(self) -> SimConfig:
        """The knobs as of now; cheap enough to call before every token."""
        if self._path is None:
            return self._config
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            self._key, self._config = None, SimConfig()
            return self._config
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        # A freed inode can be reused by the next atomic replace and file systems with coarse
        # timestamps may give it the same mtime: a recently written file is always re-read.
        recent = time.time_ns() - st.st_mtime_ns < RECENT_NS
        if key != self._key or recent:
            try:
                data = json.loads(self._path.read_text(encoding="utf-8"))
                self._config = SimConfig.from_mapping(data)
                self._key = key
            except (OSError, ValueError, TypeError):
                pass  # half-written or invalid: keep the previous knobs, retry next time
        return self._config


def write_sim_config(sandbox: Path, knobs: Mapping[str, Any], *, merge: bool = True) -> dict[str, Any]:
    """Atomically write ``<sandbox>/sim.json``; with ``merge`` the knobs update the current file.

    Unknown knob names raise ``KeyError`` (a typo would otherwise silently do nothing), values of
    the wrong type ``ValueError``.
    Returns the knobs now in effect.
    """
    unknown = set(knobs) - set(DEFAULTS) - set(EVENT_KNOBS)
    if unknown:
        raise KeyError(f"unknown sim knobs: {sorted(unknown)}")
    events = {k: knobs[k] for k in EVENT_KNOBS if knobs.get(k) is not None}
    for name, value in events.items():
        low, high = (0, 100) if name == "battery_pct" else (-40, 150)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ValueError(f"sim knob {name} must be a number from {low} to {high}")
    knobs = {k: v for k, v in knobs.items() if k not in EVENT_KNOBS}
    path = sandbox / SIM_JSON
    data = dict(DEFAULTS)
    if merge and path.is_file():
        with contextlib.suppress(OSError, ValueError):
            data.update(json.loads(path.read_text(encoding="utf-8")))
    data.update(knobs)
    SimConfig.from_mapping(data)  # a bad value fails here, in the writer, not silently in the phone
    fd, tmp = tempfile.mkstemp(prefix=".sim.", suffix=".json", dir=sandbox)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if events:
        from server.sim.physics import PhoneBody  # physics reads these knobs: imported here, not above

        PhoneBody(sandbox).set(**events)
    return data
