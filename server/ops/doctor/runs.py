"""Check 3, arch pin (the bundle's Hexagon arch against the phone's SoC, refused with the model card's
reason) and check 4, one-shot run: the card's command line with its fixed prompt (greedy, as the
one-shot CLI always is): exit code, the stderr tail on failure, load time, and the decode rate of its
stats line against the card's."""

from __future__ import annotations

import asyncio
import math
import re
import time

from server.backends.adb.discovery import SOC_ARCH, arch_mismatch
from server.backends.adb.quoting import sh_quote
from server.backends.adb.transport import STDERR, STDOUT, open_shell
from server.ops.doctor.context import (
    CARD_ARCH_PIN,
    MAX_NEW,
    PROMPT,
    SLOW_SHARE,
    OneShotRun,
    PhoneContext,
    Raw,
    Skip,
    fmt_tps,
    tail,
)
from server.ops.doctor.report import CheckResult, Status
from server.ops.provision import bundle_arch
from server.settings import DEFAULT_LAUNCH

_LOADED = re.compile(r"load(?:ed)?\b[^\n]*?\bin\s+([\d.]+)\s*ms", re.IGNORECASE)
_RATE = re.compile(r"\(?\b([\d.]+|inf)\s*tok/s", re.IGNORECASE)
EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND = 126, 127


async def check_arch(ctx: PhoneContext) -> CheckResult:
    if ctx.bundle is None or ctx.manifest is None:
        raise Skip("no bundle manifest to read (see staging)")
    fields = bundle_arch(ctx.manifest, ctx.bundle.name)
    built = fields.get("arch") or SOC_ARCH.get(fields.get("soc_model", ""))
    soc, arch = ctx.report.soc, ctx.report.arch
    data = {"bundle": ctx.bundle.name, "bundle_arch": built, "bundle_soc": fields.get("soc_model"), "soc": soc,
            "arch": arch}
    if not fields:
        return ctx.result(Status.PASS, f"{ctx.bundle.name}: the manifest does not say its arch; the runtime "
                          "decides at load", data=data)
    why = arch_mismatch(fields, soc)
    if why:
        fits = [b.name for b in ctx.bundles if b is not ctx.bundle]
        command = ctx.doctor("--bundle", fits[0]) if fits else "qhx-server devices"
        advice = (f"try the phone's other bundle {fits[0]}" if fits else
                  f"a {built} bundle runs only on {fields.get('soc_model') or 'its SoC'}: serve from such a "
                  "phone (qhx-server devices lists every phone's SoC)")
        return ctx.result(Status.FAIL, f"{ctx.bundle.name}: {why}", advice=advice, command=command,
                          details=[f"model card: \"{CARD_ARCH_PIN}\""], data=data)
    return ctx.result(Status.PASS, f"{ctx.bundle.name} built for Hexagon {built}"
                      + (f" ({fields['soc_model']})" if "soc_model" in fields else "")
                      + f"; the phone is {soc} (Hexagon {arch or built})", data=data)


async def run_oneshot(ctx: PhoneContext, prompt: str, max_new: int, label: str) -> OneShotRun:
    """Run the card's command line once; PhoneLost/TimeoutError as raised, the process killed then."""
    assert ctx.bundle is not None
    command = ctx.launcher().command(ctx.bundle, prompt, max_new)
    settings = ctx.settings
    ctx.steps.step(ctx.serial, f"{label}: loading the model")
    t0 = time.monotonic()
    ctx.runtime_command = command
    stream = await open_shell(ctx.client, ctx.serial, command)
    out, err = bytearray(), bytearray()
    first: float | None = None
    try:
        stream.close_stdin()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.ready_timeout_s + settings.stall_timeout_s
        while True:
            async with asyncio.timeout_at(deadline):
                packets = await stream.read_packets()
            if not packets:
                break
            for kind, data in packets:
                if kind == STDOUT and data:
                    if first is None:
                        first = time.monotonic()
                        ctx.steps.step(ctx.serial, f"{label}: decoding")
                    out += data
                    deadline = loop.time() + settings.stall_timeout_s
                elif kind == STDERR:
                    err += data
    except TimeoutError:
        waited = settings.ready_timeout_s + settings.stall_timeout_s if first is None else settings.stall_timeout_s
        raise TimeoutError(f"no output for {waited:g} s" + (" (hang at load?)" if first is None else "")
                           + "; the process was killed", tail(err.decode("utf-8", "replace"))) from None
    finally:
        stream.abort()
    end = time.monotonic()
    text = err.decode("utf-8", "replace")
    loaded = _LOADED.findall(text)
    rates = _RATE.findall(text)
    tok = await ctx.host_tokenizer() if out else None
    tokens = len(tok.encode(out.decode("utf-8", "replace"))) if tok else 0
    if rates:
        tps = float(rates[-1])
    elif first is not None and tokens:
        tps = tokens / (end - first) if end > first else math.inf
    else:
        tps = None
    return OneShotRun(bytes(out), tail(text), stream.exit_code, float(loaded[-1]) if loaded else
                      (None if first is None else (first - t0) * 1000), tps, tokens, end - t0)


def repro(ctx: PhoneContext, command: str) -> str:
    """``adb shell "<command>"`` for the user's shell, as the card writes it."""
    return ctx.adb("shell", Raw(_dq(command)))


async def check_oneshot(ctx: PhoneContext) -> CheckResult:
    assert ctx.bundle is not None
    if ctx.busy:
        raise Skip("the phone is busy: qhx_generate pid " + " ".join(str(pid) for pid, _ in ctx.busy)
                   + " already runs there (see staging)")
    command = ctx.launcher().command(ctx.bundle, PROMPT, MAX_NEW)
    by_hand = repro(ctx, command)
    try:
        run = await run_oneshot(ctx, PROMPT, MAX_NEW, "one-shot run")
    except TimeoutError as e:
        why, stderr = e.args if len(e.args) == 2 else (str(e), [])
        return ctx.result(Status.FAIL, f"the card's command line: {why}",
                          advice="run it by hand and watch where it stops (the runtime's log is on stderr)",
                          command=by_hand, details=[f"stderr: {line}" for line in stderr], data={"command_line": command})
    ctx.oneshot = run
    data: dict[str, object] = {"command_line": command, "exit_code": run.exit_code, "load_ms": run.load_ms, "tokens": run.tokens,
            "tps": run.tps, "card_tps": ctx.card_tps, "seconds": round(run.seconds, 3)}
    details = [f"stderr: {line}" for line in run.stderr_tail]
    if run.exit_code != 0:
        return _failed(ctx, run, by_hand, details, data)
    if not run.stdout:
        return ctx.result(Status.FAIL, "exit 0 but no text generated", advice="run it by hand",
                          command=by_hand, details=details, data=data)
    text = run.stdout.decode("utf-8", "replace")
    load = f"load {run.load_ms:.0f} ms" if run.load_ms is not None else "load time not reported"
    rate = fmt_tps(run.tps)
    said = f"exit 0, {run.tokens} tokens, {load}, {rate}"
    share = run.tps / ctx.card_tps if run.tps is not None else None
    if share is not None and math.isfinite(share):
        said += f" ({share:.0%} of the card's {ctx.card_tps:g})"
    said += f"; output {text[:40]!r}"
    if share is not None and share < SLOW_SHARE:
        return ctx.result(Status.WARN, said, advice=f"below {SLOW_SHARE:.0%} of the model card's rate: a hot or "
                          "throttled phone, battery saver, or another runtime build; let it cool, plug it in, "
                          "check its thermal status", command=ctx.adb_shell("dumpsys thermalservice | head -n 3"),
                          data=data)
    return ctx.result(Status.PASS, said, data=data)


def _failed(ctx: PhoneContext, run: OneShotRun, repro: str, details: list[str],
            data: dict[str, object]) -> CheckResult:
    code = run.exit_code
    if code is None:
        return ctx.result(Status.FAIL, "the adb stream dropped before the runtime exited",
                          advice="check the cable and run it by hand", command=repro, details=details, data=data)
    if code in (EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND):
        what = "cannot be executed" if code == EXIT_NOT_EXECUTABLE else "was not found or cannot start"
        return ctx.result(Status.FAIL, f"exit {code}: {ctx.root}/qhx_generate {what}",
                          advice="this Android may refuse to run binaries from there (a noexec mount): "
                          "/data/local/tmp is the place the shell user may run them", details=details,
                          command=ctx.adb_shell(f"mount | grep ' /data '; ls -l {sh_quote(f'{ctx.root}/qhx_generate')}"), data=data)
    last = run.stderr_tail[-1] if run.stderr_tail else "nothing on stderr"
    if ctx.settings.launch_command != DEFAULT_LAUNCH:
        return ctx.result(Status.FAIL, f"exit {code}: {last[:160]}", advice="the launch command is not the model "
                          "card's (--launch-command or QHX_LAUNCH_COMMAND); check it, or run without it",
                          command=f"env -u QHX_LAUNCH_COMMAND {ctx.doctor('--quick')}",
                          details=details + [f"by hand: {repro}"], data=data)
    return ctx.result(Status.FAIL, f"exit {code}: {last[:160]}",
                      advice="the runtime failed to load or run the bundle (stderr above); a truncated or "
                      "mismatched file is fixed by pushing the bundle again", command=ctx.provision(),
                      details=details + [f"by hand: {repro}"], data=data)


def _dq(command: str) -> str:
    """``command`` in double quotes for the user's shell (the card writes ``adb shell "cd ... && ..."``)."""
    return '"' + command.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`") + '"'
