"""What doctor's checks of one phone share: the options, the model card's facts, what earlier checks
found (props, files, bundle, tokenizer, the one-shot output, the open session), and the commands
doctor tells the user to run (always spelled for this phone and its adb server)."""

from __future__ import annotations

import asyncio
import math
import shlex
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adbutils.errors import AdbError

from server.backends.adb.discovery import Bundle
from server.backends.adb.launcher import Launcher
from server.backends.adb.session import Session
from server.backends.adb.tokenizer_cache import ensure_tokenizer
from server.backends.adb.transport import (
    DEFAULT_ADB_PORT,
    AdbServerClient,
    ShellResult,
    list_devices,
    parse_server,
    run_shell,
)
from server.ops.doctor.report import CheckResult, PhoneReport, Status
from server.ops.progress import Steps
from server.ops.provision import Plan
from server.serving.tokens import ENDOFTEXT, IM_END, HostTokenizer
from server.settings import Settings

# The model card (Qwen3.5-0.8B, Hexagon v81): its command line's prompt, its measured decode rates on
# SM8850, and its file sizes (approximate: the card rounds to MB).
PROMPT = "The capital of France is"
MAX_NEW = 32  # the card runs 64; 32 measures the rate as well in half the wait
CARD_TPS = {"fp16": 22.7, "w8": 24.2}
CARD_SIZES = {
    "qwen3508b_decode_f16.bin": 961e6,
    "qwen3508b_decode_w8.bin": 489e6,
    "qwen3508b_lmhead_f16.bin": 487e6,
    "qwen3508b_embed_f16.bin": 485e6,
    "tokenizer.json": 20e6,
}
CARD_ARCH_PIN = ("Arch-pinned: a v81 binary will not load on another Hexagon arch (the soc_model/dsp_arch "
                 "are baked in).")
SLOW_SHARE = 0.8  # a decode rate below this share of the card's is a warning
CARD_BUNDLE_DIR = {"fp16": "v81", "w8": "v81-w8"}  # the card's folder of each precision


class Raw(str):
    """A word of a suggested command written as is for the user's shell (a ``<placeholder>``, a
    ``"$VARIABLE"``); every other word is quoted."""


def words(args: tuple[str, ...]) -> list[str]:
    return [a if isinstance(a, Raw) else shlex.quote(a) for a in args]


class Skip(Exception):
    """The check cannot run (an earlier one makes it pointless); the message says why."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Something a check found wrong: what, what to do about it, and the exact command to run next."""

    what: str
    advice: str
    command: str


@dataclass(slots=True)
class Findings:
    """A check's problems in the order found (the first failure, else the first warning, leads with
    its advice and command; the others become detail lines) and, when all is well, its notes."""

    fails: list[Problem] = field(default_factory=list)
    warns: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, what: str, advice: str, command: str) -> None:
        self.fails.append(Problem(what, advice, command))

    def warn(self, what: str, advice: str, command: str) -> None:
        self.warns.append(Problem(what, advice, command))

    def result(self, data: Mapping[str, Any] | None = None, *, summary: str | None = None) -> CheckResult:
        """``summary`` replaces the joined notes of a pass (and leads a warning's own text)."""
        problems = self.fails + self.warns
        if not problems:
            return CheckResult("", Status.PASS, summary or "; ".join(self.notes), data=_finite(data))
        first = problems[0]
        commands = list(dict.fromkeys(p.command for p in problems))
        details = [f"also: {p.what}" for p in problems[1:]] + [f"then: {c}" for c in commands[1:]]
        return CheckResult("", Status.FAIL if self.fails else Status.WARN, first.what, first.advice, first.command,
                           details, _finite(data))


@dataclass(frozen=True, slots=True)
class Options:
    """The command line of one doctor run."""

    serials: tuple[str, ...] = ()
    all_phones: bool = False
    bundle: str | None = None  # a bundle on the phone, by name
    local_bundle: Path | None = None  # --bundle DIR: the local copy to compare sizes and sha256 with
    quick: bool = False
    health_s: float = 20.0
    parallel: int = 4

    def to_json(self) -> dict[str, Any]:
        return {"serials": list(self.serials), "all": self.all_phones, "bundle": self.bundle,
                "local_bundle": str(self.local_bundle) if self.local_bundle else None, "quick": self.quick,
                "health_seconds": self.health_s, "parallel": self.parallel}


@dataclass(slots=True)
class OneShotRun:
    """What one run of the card's command line printed."""

    stdout: bytes
    stderr_tail: list[str]
    exit_code: int | None
    load_ms: float | None
    tps: float | None  # the runtime's own stats line, else measured here; inf: no measurable time
    tokens: int
    seconds: float


@dataclass(slots=True)
class PhoneContext:
    """One phone under examination (see the module docstring)."""

    client: AdbServerClient
    serial: str
    adb_state: str
    settings: Settings
    options: Options
    steps: Steps
    report: PhoneReport
    plan: Plan | None = None  # the local copy's files (--bundle DIR), hashed once for all phones
    props: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[int, bool]] = field(default_factory=dict)  # rel -> (size, executable)
    bundles: list[Bundle] = field(default_factory=list)
    bundle: Bundle | None = None
    manifest: dict[str, Any] | None = None
    tokenizer: HostTokenizer | None = None
    tokenizer_path: Path | None = None
    oneshot: OneShotRun | None = None
    session: Session | None = None
    session_ids: list[int] | None = None
    session_tps: float | None = None
    runtime_command: str | None = None  # the last runtime command line started on the phone
    busy: list[tuple[int, str]] = field(default_factory=list)  # runtimes already running (pid, command)
    results: dict[str, CheckResult] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return self.settings.device_root.rstrip("/") or "/"

    @property
    def precision(self) -> str:
        return self.bundle.precision if self.bundle else "fp16"

    @property
    def card_tps(self) -> float:
        return CARD_TPS.get(self.precision, CARD_TPS["fp16"])

    def launcher(self) -> Launcher:
        return Launcher(self.client, self.serial, self.settings, name=self.serial)

    async def shell(self, command: str, timeout: float | None = None) -> ShellResult:
        return await run_shell(self.client, self.serial, command, timeout=timeout or self.settings.adb_timeout_s)

    async def host_tokenizer(self) -> HostTokenizer:
        """The bundle's tokenizer.json, pulled to the host cache once (as the server does)."""
        if self.tokenizer is None:
            assert self.bundle is not None
            self.steps.step(self.serial, "tokenizer: fetching the bundle's tokenizer.json (once) and loading it")
            _, path = await ensure_tokenizer(self.client, self.serial, f"{self.root}/{self.bundle.name}",
                                             self.settings)
            self.tokenizer_path = path
            self.tokenizer = await _load(path)
        return self.tokenizer

    async def listed_state(self) -> str:
        """How adb lists the phone now (``device``, ``offline``..., ``not listed``; ``unknown`` when the
        adb server does not answer)."""
        try:
            async with asyncio.timeout(self.settings.adb_timeout_s + 1):
                devices = await list_devices(self.client)
        except (AdbError, OSError, TimeoutError):
            return "unknown"
        return devices.get(self.serial, "not listed")

    def stop_ids(self, tok: HostTokenizer) -> list[int]:
        return [tok.special_id(ENDOFTEXT), tok.special_id(IM_END)]

    # -- commands to tell the user

    def adb(self, *args: str) -> str:
        """``adb`` spelled for this phone's adb server and serial, then ``args`` (each quoted for the
        user's shell unless :class:`Raw`)."""
        return " ".join([adb_base(self.client.address), "-s", shlex.quote(self.serial), *words(args)])

    def adb_shell(self, command: str) -> str:
        """``adb shell`` with a command for the phone's shell (whose own words the caller quoted for
        the phone: :func:`~server.backends.adb.quoting.sh_quote` every path)."""
        return self.adb("shell", command)

    def provision(self) -> str:
        """The provisioning command for this phone's bundle (the card's folder of its precision)."""
        local = str(self.options.local_bundle) if self.options.local_bundle else CARD_BUNDLE_DIR.get(
            self.precision, "v81")
        return self.qhx("provision", "--bundle", local, "--serial", self.serial)

    def doctor(self, *more: str) -> str:
        return self.qhx("doctor", "--serial", self.serial, *more)

    def qhx(self, command: str, *args: str) -> str:
        """A qhx-server command with this run's adb server and device root when not the defaults (each
        argument quoted for the user's shell unless :class:`Raw`)."""
        extra = []
        if self.settings.adb_servers:
            extra += ["--adb-server", self.client.address]
        if self.root != "/data/local/tmp/wq":
            extra += ["--device-root", self.root]
        return " ".join(["qhx-server", command, *words((*args, *extra))])

    def result(self, status: Status, summary: str, *, advice: str | None = None, command: str | None = None,
               details: list[str] | None = None, data: Mapping[str, Any] | None = None) -> CheckResult:
        return CheckResult("", status, summary, advice, command, details or [], _finite(data))


def adb_base(address: str) -> str:
    """``adb`` with ``-H``/``-P`` when the server is not the local default one."""
    host, port = parse_server(address)
    parts = ["adb"]
    if host not in ("127.0.0.1", "localhost"):
        parts += ["-H", shlex.quote(host)]
    if port != DEFAULT_ADB_PORT:
        parts += ["-P", str(port)]
    return " ".join(parts)


def _finite(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON has no infinity: an unmeasurably fast rate is null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in (data or {}).items()}


# the host tokenizers loaded so far, by file (the cache names it by sha256): a bench of phones with the
# same bundle loads it once, not once per phone (seconds of CPU and ~100 MB each)
_TOKENIZERS: dict[tuple[str, int, int], HostTokenizer] = {}
_TOKENIZERS_LOCK = threading.Lock()
_TOKENIZERS_KEPT = 4


def _load_shared(path: Path) -> HostTokenizer:
    with _TOKENIZERS_LOCK:  # phones checked at once wait for the first load instead of loading too
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        tok = _TOKENIZERS.get(key)
        if tok is None:
            tok = HostTokenizer.from_file(path)
            while len(_TOKENIZERS) >= _TOKENIZERS_KEPT:
                del _TOKENIZERS[next(iter(_TOKENIZERS))]
            _TOKENIZERS[key] = tok
        return tok


async def _load(path: Path) -> HostTokenizer:
    return await asyncio.to_thread(_load_shared, path)


def fmt_tps(tps: float | None) -> str:
    if tps is None:
        return "? tok/s"
    if not math.isfinite(tps):
        return "unbounded tok/s (no measurable decode time)"
    return f"{tps:.1f} tok/s"


def tail(text: str, lines: int = 6) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()][-lines:]
