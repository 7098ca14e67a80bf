"""Which phones, and the checks in order on each (phones in parallel, at most ``--parallel`` at once).

A check whose prerequisites failed or were skipped is skipped with the reason (``needs``); one that
cannot run for a reason of its own raises :class:`~server.ops.doctor.context.Skip`. A phone that stops
answering during a check fails that check (and the later ones are skipped), it never stops the run.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import platform
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

from adbutils.errors import AdbConnectionError, AdbError

from server.backends.adb.transport import (
    AdbServerClient,
    format_server,
    list_devices,
    parse_server,
    resolve_adb_servers,
)
from server.errors import QhxError
from server.ops.doctor.adbcheck import NOT_LISTED, STATE_FIX, check_adb
from server.ops.doctor.context import Options, PhoneContext, Skip, adb_base
from server.ops.doctor.determinism import check_determinism
from server.ops.doctor.health import check_health
from server.ops.doctor.protocol import check_session
from server.ops.doctor.report import CheckResult, DoctorReport, PhoneReport, ServerReport, Status
from server.ops.doctor.runs import check_arch, check_oneshot, repro
from server.ops.doctor.staging import check_staging
from server.ops.progress import Steps
from server.ops.provision import Plan
from server.settings import Settings

logger = logging.getLogger(__name__)

Check = Callable[[PhoneContext], Awaitable[CheckResult]]
# (name, check, the checks whose failure or skip makes it pointless)
CHECKS: list[tuple[str, Check, tuple[str, ...]]] = [
    ("adb", check_adb, ()),
    ("staging", check_staging, ("adb",)),
    ("arch", check_arch, ("adb",)),
    ("oneshot", check_oneshot, ("staging", "arch")),
    ("session", check_session, ("oneshot",)),
    ("determinism", check_determinism, ("session",)),
    ("health", check_health, ("session",)),
]
T = TypeVar("T")
SETTLE_POLLS, SETTLE_POLL_S = 4, 0.5  # how long a check cut short waits for adb's view to settle


class Ambiguous(Exception):
    """Several phones and neither --serial nor --all: which to check is the user's choice."""


@dataclass(frozen=True, slots=True)
class Target:
    client: AdbServerClient
    serial: str
    state: str


def versions(servers: Sequence[ServerReport]) -> dict[str, object]:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"qhx_server": version("qhx-server"), "python": platform.python_version(),
            "adbutils": version("adbutils"), "adb": {s.address: s.version for s in servers}}


async def list_servers(settings: Settings) -> tuple[list[ServerReport], dict[str, Target]]:
    """Every adb server's report, and the phones they list (the first server listing a serial wins)."""
    reports: list[ServerReport] = []
    listed: dict[str, Target] = {}
    for host, port in resolve_adb_servers(settings):
        address = format_server(host, port)
        client = AdbServerClient(address, timeout=settings.adb_timeout_s)
        try:
            async with asyncio.timeout(settings.adb_timeout_s + 1):
                devices = await list_devices(client)
                version = await asyncio.to_thread(client.server_version)
        except (AdbError, OSError, TimeoutError, ValueError) as e:
            reports.append(_unreachable(address, host, e))
            continue
        reports.append(ServerReport(address, True, version=int(version), phones=len(devices)))
        for serial, state in sorted(devices.items()):
            listed.setdefault(serial, Target(client, serial, state))
    return reports, listed


def _unreachable(address: str, host: str, e: BaseException) -> ServerReport:
    """An adb server that did not answer: nothing listens there (start one), or something that is not
    an adb server does (a phone's own adbd port, such as 5555, given as --adb-server)."""
    error = str(e) or type(e).__name__
    if not isinstance(e, AdbConnectionError | ConnectionError):  # connected, then no adb answer
        return ServerReport(address, False, error=f"{error}: something listens there but does not answer as an adb "
                            "server (a phone's own adb port, such as 5555? connect the phone with this command "
                            "and give --adb-server the adb server's address, 127.0.0.1:5037 by default)",
                            command=f"adb connect {shlex.quote(address)}")
    local = host in ("127.0.0.1", "localhost")
    return ServerReport(address, False, error=error, command=f"{adb_base(address)} start-server" if local
                        else f"{adb_base(address)} devices -l")


def choose(settings: Settings, options: Options, servers: list[ServerReport],
           listed: dict[str, Target]) -> tuple[list[Target], CheckResult | None]:
    """(the phones to check, or why none can be). Ambiguous with several phones and no choice."""
    reachable = [s for s in servers if s.reachable]
    if not reachable:
        return [], CheckResult("adb", Status.FAIL, "no adb server answered",
                               advice="start the adb server (or name the right one with --adb-server)",
                               command=servers[0].command if servers else "adb start-server")
    if options.serials:
        fallback = AdbServerClient(reachable[0].address, timeout=settings.adb_timeout_s)
        return [listed.get(s) or Target(fallback, s, NOT_LISTED) for s in dict.fromkeys(options.serials)], None
    if (options.all_phones or len(listed) == 1) and listed:
        return list(listed.values()), None
    if not listed:
        where = ", ".join(s.address for s in reachable)
        return [], CheckResult("adb", Status.FAIL, f"no phone listed by adb server {where}",
                               advice="plug a phone in with USB debugging on (Developer options), or adb connect "
                               "one over Wi-Fi", command=f"{adb_base(reachable[0].address)} devices -l")
    raise Ambiguous(f"{len(listed)} phones listed ("
                    + ", ".join(f"{t.serial} {t.state}" for t in listed.values())
                    + "): choose with --serial S or check them all with --all")


async def bounded(jobs: Sequence[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run the jobs, at most ``limit`` at once; results in job order."""
    gate = asyncio.Semaphore(max(1, limit))

    async def one(job: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(one(job) for job in jobs)))


async def doctor(settings: Settings, options: Options, steps: Steps | None = None,
                 plan: Plan | None = None) -> DoctorReport:
    """Check the chosen phones; the report (Ambiguous when the choice is the user's)."""
    steps = steps or Steps()
    servers, listed = await list_servers(settings)
    report = DoctorReport(versions(servers), options.to_json(), servers,
                          created=datetime.now(UTC).isoformat(timespec="seconds"))
    targets, report.problem = choose(settings, options, servers, listed)
    jobs = [_job(t, settings, options, steps, plan) for t in targets]
    report.phones = await bounded(jobs, options.parallel)
    return report


def _job(target: Target, settings: Settings, options: Options, steps: Steps,
         plan: Plan | None) -> Callable[[], Awaitable[PhoneReport]]:
    async def run() -> PhoneReport:
        return await check_phone(target, settings, options, steps, plan)

    return run


async def check_phone(target: Target, settings: Settings, options: Options, steps: Steps,
                      plan: Plan | None = None) -> PhoneReport:
    """Every check on one phone, in order (see the module docstring)."""
    report = PhoneReport(target.serial, target.client.address, target.state)
    ctx = PhoneContext(target.client, target.serial, target.state, settings, options, steps, report, plan)
    t0 = time.monotonic()
    try:
        for name, check, needs in CHECKS:
            started = time.monotonic()
            reason = _blocked(ctx, needs)
            if reason is not None:
                result = CheckResult(name, Status.SKIP, reason)
            else:
                steps.step(target.serial, name)
                result = await _run(ctx, name, check)
            result.name = name
            result.seconds = time.monotonic() - started
            report.checks.append(result)
            ctx.results[name] = result
    finally:
        if ctx.session is not None:
            await ctx.session.close()
    report.seconds = time.monotonic() - t0
    steps.done(target.serial, report.verdict())
    return report


def _blocked(ctx: PhoneContext, needs: tuple[str, ...]) -> str | None:
    for name in needs:
        result = ctx.results.get(name)
        if result is None:
            continue
        if result.status is Status.FAIL:
            return f"not run: {name} failed"
        if result.status is Status.SKIP:
            return result.summary
    return None


async def _lost(ctx: PhoneContext, e: BaseException) -> CheckResult:
    """A check cut short by the phone, the adb server or the runtime: which of them, as adb lists the
    phone now, and what to do about that one."""
    state = await ctx.listed_state()
    for _ in range(SETTLE_POLLS):  # a phone whose debugging was revoked passes through offline
        if state not in ("offline", "connecting", "authorizing"):
            break
        await asyncio.sleep(SETTLE_POLL_S)
        state = await ctx.listed_state()
    adb = adb_base(ctx.client.address)
    data = {"adb_state": state, "error": str(e) or type(e).__name__}
    if state == "unknown":
        local = parse_server(ctx.client.address)[0] in ("127.0.0.1", "localhost")
        return ctx.result(Status.FAIL, f"the adb server {ctx.client.address} stopped answering during this check: {e}",
                          advice="start it again (a new adb server knows no phone connected over TCP or Wi-Fi: "
                          "adb connect those again), then run doctor again",
                          command=f"{adb} start-server" if local else f"{adb} devices -l", data=data)
    if state == "device":  # the phone is there: what stopped is the runtime (or the shell) on it
        by_hand = repro(ctx, ctx.runtime_command) if ctx.runtime_command else None
        return ctx.result(Status.FAIL, f"failed while adb still lists the phone: {e}",
                          advice="the runtime crashed, stalled or broke the protocol: run it by hand and read "
                          "its stderr" if by_hand else "the phone's shell did not answer in time: retry with a "
                          "longer --adb-timeout-s", command=by_hand or ctx.doctor("--adb-timeout-s", "30"), data=data)
    if state == NOT_LISTED:
        tcp = ":" in ctx.serial
        return ctx.result(Status.FAIL, f"the phone went away during this check (adb no longer lists it): {e}",
                          advice="connect it again (adb over Wi-Fi/TCP)" if tcp else
                          "plug it in again (check the cable and the hub), then run doctor again",
                          command=f"{adb} connect {shlex.quote(ctx.serial)}" if tcp else f"{adb} devices -l",
                          data=data)
    return ctx.result(Status.FAIL, f"the phone stopped answering during this check (adb now lists it: {state}): {e}",
                      advice=STATE_FIX.get(state, "check the cable (or the Wi-Fi link) and that adb still lists "
                                           "the phone"), command=f"{adb} reconnect offline", data=data)


async def _run(ctx: PhoneContext, name: str, check: Check) -> CheckResult:
    try:
        return await check(ctx)
    except Skip as e:
        return CheckResult(name, Status.SKIP, f"not run: {e}")
    except (QhxError, AdbError, OSError, TimeoutError) as e:
        return await _lost(ctx, e)
    except Exception as e:  # a doctor that dies with a traceback helps nobody: report it as a failure
        logger.exception("%s: check %s crashed", ctx.serial, name)
        return ctx.result(Status.FAIL, f"doctor itself failed in this check: {e!r}",
                          advice="report it (a qhx-server bug) with this output", command=ctx.doctor("--json"))
