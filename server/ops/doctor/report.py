"""What doctor found: one result per check and phone, the report as text and as JSON.

The JSON document's schema is in docs/doctor.md (the tests validate ``--json`` output against it):
``to_json`` and that schema change together.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1
CHECK_NAMES = ("adb", "staging", "arch", "oneshot", "session", "determinism", "health")


class Status(enum.StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(slots=True)
class CheckResult:
    """One check on one phone. A warn or fail always says what to do (``advice``) and the exact
    command to run next (``command``)."""

    name: str
    status: Status
    summary: str  # what was measured, one line
    advice: str | None = None
    command: str | None = None
    details: list[str] = field(default_factory=list)  # further lines: stderr tail, missing files
    data: dict[str, Any] = field(default_factory=dict)  # the measured values, for --json
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status.value, "summary": self.summary, "advice": self.advice,
                "command": self.command, "details": list(self.details), "data": self.data,
                "seconds": round(self.seconds, 3)}


@dataclass(slots=True)
class PhoneReport:
    """Every check of one phone, in order, with what identifies the phone."""

    serial: str
    adb_server: str
    adb_state: str
    android: str | None = None
    sdk: str | None = None
    model: str | None = None
    soc: str | None = None
    arch: str | None = None
    simulated: bool = False
    bundle: str | None = None
    checks: list[CheckResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(c.status is Status.FAIL for c in self.checks)

    def count(self, status: Status) -> int:
        return sum(c.status is status for c in self.checks)

    def headline(self) -> str:
        who = [self.model or "?", f"Android {self.android}" + (f" (SDK {self.sdk})" if self.sdk else "")
               if self.android else None, f"{self.soc} (Hexagon {self.arch or '?'})" if self.soc else None,
               "simulated" if self.simulated else None, f"bundle {self.bundle}" if self.bundle else None]
        known = ", ".join(w for w in who if w and w != "?")
        return f"{self.serial} via adb server {self.adb_server}: " + (known or f"adb state {self.adb_state}")

    def verdict(self) -> str:
        counts = ", ".join(f"{self.count(s)} {s.value}" for s in Status)
        word = "ok" if self.ok else "FAILED"
        return f"{self.serial}: {word} ({counts}) in {self.seconds:.1f} s"

    def to_json(self) -> dict[str, Any]:
        return {"serial": self.serial, "adb_server": self.adb_server, "adb_state": self.adb_state,
                "android": self.android, "sdk": self.sdk, "model": self.model, "soc": self.soc,
                "arch": self.arch, "simulated": self.simulated, "bundle": self.bundle, "ok": self.ok,
                "seconds": round(self.seconds, 3), "checks": [c.to_json() for c in self.checks]}


@dataclass(slots=True)
class ServerReport:
    """One adb server: reachable or not (and then what to do), its version, how many phones it lists."""

    address: str
    reachable: bool
    version: int | None = None
    phones: int = 0
    error: str | None = None
    command: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "reachable": self.reachable, "version": self.version,
                "phones": self.phones, "error": self.error, "command": self.command}


@dataclass(slots=True)
class DoctorReport:
    """The whole run. ``problem``: why no phone could be checked at all (no phone listed)."""

    versions: dict[str, Any]
    options: dict[str, Any]
    servers: list[ServerReport] = field(default_factory=list)
    phones: list[PhoneReport] = field(default_factory=list)
    problem: CheckResult | None = None
    created: str = ""

    @property
    def ok(self) -> bool:
        """Phones were checked and none failed, and every adb server answered (the phones of one that
        did not were not checked)."""
        return (self.problem is None and bool(self.phones) and all(p.ok for p in self.phones)
                and all(s.reachable for s in self.servers))

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def totals(self) -> dict[str, int]:
        return {s.value: sum(p.count(s) for p in self.phones) for s in Status}

    def to_json(self) -> dict[str, Any]:
        """The document (docs/doctor.md's schema); JSON has no infinity or NaN: such a value is null,
        at any depth."""
        return _finite({
            "doctor": SCHEMA_VERSION,
            "created": self.created,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "versions": self.versions,
            "options": self.options,
            "adb_servers": [s.to_json() for s in self.servers],
            "problem": self.problem.to_json() if self.problem else None,
            "phones": [p.to_json() for p in self.phones],
            "summary": self.totals(),
        })

    def render(self) -> str:
        """The report as text: versions and adb servers, then per phone one line per check (what
        to do and the next command under every warn and fail), then the verdict."""
        v = self.versions
        lines = [f"qhx-server doctor: qhx-server {v['qhx_server']}, Python {v['python']}, adbutils {v['adbutils']}"]
        for s in self.servers:
            if s.reachable:
                lines.append(f"adb server {s.address}: version {s.version}, {s.phones} phone(s) listed")
            else:
                lines.append(f"adb server {s.address}: UNREACHABLE ({s.error})")
                if s.command:
                    lines.append(f"    next: {s.command}")
        if self.problem is not None:
            lines.append("")
            lines.extend(_check_lines(self.problem))
        for phone in self.phones:
            lines += ["", phone.headline()]
            for check in phone.checks:
                lines.extend(_check_lines(check))
            lines.append("  => " + phone.verdict())
        failed = [p.serial for p in self.phones if not p.ok]
        down = [s.address for s in self.servers if not s.reachable]
        if self.phones:
            lines += ["", f"{len(self.phones)} phone(s) checked, {len(failed)} failed"
                      + (f" ({', '.join(failed)})" if failed else "")
                      + (f"; adb server {', '.join(down)} did not answer (its phones were not checked)" if down else "")
                      + f"; exit status {self.exit_code}"]
        else:
            lines += ["", f"no phone checked; exit status {self.exit_code}"]
        return "\n".join(lines) + "\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _check_lines(check: CheckResult) -> list[str]:
    lines = [f"  {check.status.value:<5} {check.name:<12} {check.summary}"]
    pad = " " * 21
    lines += [pad + d for d in check.details]
    if check.advice:
        lines.append(f"{pad}fix:  {check.advice}")
    if check.command:
        lines.append(f"{pad}next: {check.command}")
    return lines
