"""Check 2, staging: what is under the device root. The runtime (``qhx_generate`` present and
executable), the QNN libraries with the skel/stub of the bundle's Hexagon arch, every bundle's
manifest, the binaries its manifest names and its tokenizer.json; sizes against the local copy
(``--bundle DIR``, then sha256 too) or, on a real phone, against the model card's; leftovers of an
interrupted provision; free space. It also picks the bundle the later checks run (as the server
would: ``--bundle``, else the fp16 ``qwen35``, else the first)."""

from __future__ import annotations

import json
from typing import Any

from server.backends.adb.discovery import SOC_ARCH, Bundle, Incompatible, choose_bundle, parse_bundles
from server.backends.adb.quoting import sh_quote
from server.backends.adb.tokenizer_cache import TOKENIZER
from server.ops.doctor.context import CARD_SIZES, Findings, PhoneContext, Raw
from server.ops.doctor.report import CheckResult, Status
from server.ops.progress import fmt_bytes
from server.ops.provision import (
    PART,
    RUNTIME_EXE,
    Refused,
    bundle_arch,
    hash_command,
    hash_timeout,
    parse_hashes,
)

QNN_LIBS = ("libQnnHtp.so", "libQnnSystem.so")
LOW_SPACE = 2e9  # below this a second bundle (fp16: ~1.9 GB) no longer fits
CARD_SHARE = 0.97  # a file this much smaller than the card's is cut short (the card rounds to MB)
# one shell for the whole listing: every file one level deep with its size (toybox stat; wc -c where
# there is none) and x bit, then free space, then the runtimes already running from the device root
# (qhx-server serve, another doctor, one left behind): a process whose command line names the runtime
# and whose working folder is the root (the pattern's [e] keeps grep and this shell from matching)
_SCRIPT = (
    "cd {root} 2>/dev/null || {{ echo 'qhx:noroot'; exit 0; }}; "
    'for f in * */*; do [ -f "$f" ] || continue; x=-; [ -x "$f" ] && x=x; '
    'echo "qhx:file:$x:$(stat -c %s "$f" 2>/dev/null || wc -c < "$f" 2>/dev/null || echo -1):$f"; done; '
    'echo "qhx:df:$(df -k . 2>/dev/null | tail -n 1)"; '
    'here=$(pwd -P); for f in $(grep -l "qhx_generat[e]" /proc/[0-9]*/cmdline 2>/dev/null); do p=${{f%/cmdline}}; '
    '[ "$(readlink "$p/cwd" 2>/dev/null)" = "$here" ] && '
    'echo "qhx:busy:${{p#/proc/}}:$(tr "\\000\\012" "  " < "$f" 2>/dev/null | head -c 400)"; done; true'
)


def parse_listing(text: str) -> tuple[bool, dict[str, tuple[int, bool]], int | None]:
    """(device root exists, rel -> (size, executable), free bytes or None) from the script's output."""
    files: dict[str, tuple[int, bool]] = {}
    free = None
    for line in text.splitlines():
        if line.strip() == "qhx:noroot":
            return False, {}, None
        if line.startswith("qhx:file:"):
            parts = line.split(":", 4)
            if len(parts) == 5:
                try:
                    size = int(parts[3])
                except ValueError:
                    size = -1
                files[parts[4]] = (size, parts[2] == "x")
        elif line.startswith("qhx:df:"):
            fields = line[7:].split()
            # ... 1K-blocks Used Available Use% Mounted-on: the available column is third from the end
            if len(fields) >= 4 and fields[-3].isdigit():
                free = int(fields[-3]) * 1024
    return True, files, free


def parse_busy(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of each runtime the script found running from the device root."""
    busy = []
    for line in text.splitlines():
        if line.startswith("qhx:busy:"):
            pid, _, command = line[9:].partition(":")
            if pid.isdigit():
                busy.append((int(pid), command.strip()))
    return busy


def manifest_files(manifest: dict[str, Any]) -> list[str]:
    """The ``.bin`` files a manifest names (anywhere in it), in order, and its tokenizer."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.endswith(".bin") and "/" not in value:
            found.append(value)

    walk(manifest)
    tokenizer = manifest.get("tokenizer")
    found.append(tokenizer if isinstance(tokenizer, str) and "/" not in tokenizer else TOKENIZER)
    return list(dict.fromkeys(found))


async def check_staging(ctx: PhoneContext) -> CheckResult:
    res = await ctx.shell(_SCRIPT.format(root=sh_quote(ctx.root)))
    exists, files, free = parse_listing(res.text())
    if not exists:
        return ctx.result(Status.FAIL, f"device root {ctx.root} does not exist",
                          advice="stage the runtime (qhx_generate, the QNN libs) and a bundle",
                          command=ctx.provision() + " --runtime <folder with qhx_generate and libQnn*.so>",
                          data={"root": ctx.root})
    ctx.files = files
    found = Findings()
    _busy(ctx, parse_busy(res.text()), found)
    bundle = await _choose_bundle(ctx, found)
    _runtime(ctx, found)
    if bundle is not None:
        await _bundle_files(ctx, bundle, found)
    _leftovers(ctx, found)
    if free is not None:
        found.notes.append(f"{fmt_bytes(free)} free")
        if free < LOW_SPACE:
            found.warn(f"only {fmt_bytes(free)} free under {ctx.root}",
                       advice="another bundle or a re-push (it writes .part files first) will not fit; "
                       "remove what is not served", command=ctx.adb_shell(f"du -sh {sh_quote(ctx.root)}/*"))
    return found.result({"root": ctx.root, "free_bytes": free, "bundles": [b.name for b in ctx.bundles],
                         "bundle": bundle.name if bundle else None, "files": len(files),
                         "busy": [{"pid": pid, "command": command} for pid, command in ctx.busy]})


def _busy(ctx: PhoneContext, busy: list[tuple[int, str]], found: Findings) -> None:
    """A runtime already running here: the runs would slow it (one NPU, a second copy of the model in
    memory) and measure the contention, so they are skipped (check_oneshot)."""
    ctx.busy = busy
    if busy:
        pids = " ".join(str(pid) for pid, _ in busy)
        command = busy[-1][1]
        command = command[max(0, command.find(RUNTIME_EXE)):]  # its arguments say which bundle and mode
        found.warn(f"the phone is busy: {RUNTIME_EXE} already runs from {ctx.root} (pid {pids}: "
                   f"{command[:100]}); the runs are not started, so as not to disturb it",
                   advice="qhx-server serve or another doctor is using this phone: check it when it is free; "
                   "a runtime left behind (nobody serves from this phone) holds the NPU and memory: kill it",
                   command=ctx.adb_shell(f"kill {pids}"))


def _runtime(ctx: PhoneContext, found: Findings) -> None:
    exe = ctx.files.get(RUNTIME_EXE)
    chmod = ctx.adb_shell(f"chmod 755 {sh_quote(f'{ctx.root}/{RUNTIME_EXE}')}")
    if exe is None:
        found.fail(f"{RUNTIME_EXE} is missing from {ctx.root}",
                   advice="push the runtime built with the qwen3_5_generate host-op",
                   command=ctx.adb("push", RUNTIME_EXE, f"{ctx.root}/") + " && " + chmod)
    elif not exe[1]:
        found.fail(f"{ctx.root}/{RUNTIME_EXE} is not executable",
                   advice="give it the x bit (adb push from some hosts drops it)",
                   command=chmod)
    arch = _arch(ctx)
    skel, stub = f"libQnnHtp{arch.upper()}Skel.so", f"libQnnHtp{arch.upper()}Stub.so"
    missing = [lib for lib in (*QNN_LIBS, skel, stub) if lib not in ctx.files]
    if missing:
        where = {lib: "lib/aarch64-android" for lib in (*QNN_LIBS, stub)} | {skel: f"lib/hexagon-{arch}/unsigned"}
        pushes = " && ".join(ctx.adb("push", Raw(f'"$QAIRT_SDK_ROOT/{where[lib]}/{lib}"'), f"{ctx.root}/")
                             for lib in missing)
        found.fail(f"{', '.join(missing)} missing from {ctx.root}",
                   advice=f"the QNN runtime libraries and the Hexagon {arch} skel/stub come from the QAIRT "
                   "SDK (2.47), not the bundle", command=pushes)
    else:
        found.notes.append(f"{RUNTIME_EXE} executable, QNN libs and {arch} skel/stub present")


def _arch(ctx: PhoneContext) -> str:
    """The Hexagon arch whose skel the runtime loads: the bundle's, else the phone's, else v81."""
    if ctx.manifest is not None and ctx.bundle is not None:
        arch = bundle_arch(ctx.manifest, ctx.bundle.name).get("arch")
        if arch:
            return arch.lower()
    return SOC_ARCH.get(ctx.report.soc or "", "v81")


async def _choose_bundle(ctx: PhoneContext, found: Findings) -> Bundle | None:
    ctx.bundles = parse_bundles(list(ctx.files))
    wanted = ctx.plan.name if ctx.plan else ctx.options.bundle or ctx.settings.bundle_of(ctx.client.address,
                                                                                      ctx.serial)
    half = _half_pushed(ctx)
    try:
        bundle = choose_bundle(ctx.bundles, wanted)
    except Incompatible as e:
        name = wanted or (half[0] if half else None)
        if name in half:
            found.fail(f"bundle {name} is half pushed: no manifest (an interrupted provision keeps it out "
                       "until every file is in place)", advice="run the provision again: it resumes",
                       command=ctx.provision())
        elif wanted and ctx.bundles:  # a name the phone does not hold: a typo more often than not
            found.fail(str(e), advice="name one of the phone's bundles",
                       command=ctx.doctor("--bundle", ctx.bundles[0].name))
        else:
            found.fail(str(e), advice="push a bundle (the model card's v81/ or v81-w8/)", command=ctx.provision())
        return None
    ctx.bundle, ctx.report.bundle = bundle, bundle.name
    res = await ctx.shell(f"cat {sh_quote(f'{ctx.root}/{bundle.manifest_path}')}")
    try:
        manifest = json.loads(res.stdout)
    except ValueError as e:
        manifest = f"not valid JSON: {e}"
    if not isinstance(manifest, dict):
        found.fail(f"manifest {bundle.manifest_path}: {manifest if isinstance(manifest, str) else 'not an object'}",
                   advice="push the bundle again", command=ctx.provision())
        return bundle
    ctx.manifest = manifest
    return bundle


def _half_pushed(ctx: PhoneContext) -> list[str]:
    """Folders holding bundle files but no manifest."""
    with_manifest = {b.name for b in ctx.bundles}
    folders = {rel.split("/", 1)[0] for rel in ctx.files if "/" in rel}
    return sorted(d for d in folders if d not in with_manifest
                  and any(rel.startswith(d + "/") and rel.endswith((".bin", ".json", PART)) for rel in ctx.files))


async def _bundle_files(ctx: PhoneContext, bundle: Bundle, found: Findings) -> None:
    names = manifest_files(ctx.manifest) if ctx.manifest is not None else [TOKENIZER]
    missing = [n for n in names if f"{bundle.name}/{n}" not in ctx.files]
    if missing:
        found.fail(f"bundle {bundle.name} lacks {', '.join(missing)}", advice="push the bundle again",
                   command=ctx.provision())
    present = [n for n in names if n not in missing]
    sizes = {n: ctx.files[f"{bundle.name}/{n}"][0] for n in present}
    empty = [n for n, size in sizes.items() if size <= 0]
    if empty:
        found.fail(f"bundle {bundle.name}: {', '.join(empty)} empty or unreadable",
                   advice="push the bundle again", command=ctx.provision())
    total = sum(max(0, s) for s in sizes.values())
    if ctx.plan is not None:
        await _against_local(ctx, bundle, found)
    elif ctx.report.simulated:
        found.notes.append(f"bundle {bundle.name} ({bundle.precision}) complete, {len(names)} files, "
                           f"{fmt_bytes(total)} (simulated placeholders: sizes not compared with the card)")
    else:
        short = [(n, size, CARD_SIZES[n]) for n, size in sizes.items()
                 if n in CARD_SIZES and 0 < size < CARD_SHARE * CARD_SIZES[n]]
        for n, size, card in short:
            found.warn(f"{bundle.name}/{n} is {fmt_bytes(size)}; the model card's is ~{fmt_bytes(card)} (cut short?)",
                       advice="compare with your local copy (sha256), or push it again",
                       command=ctx.doctor(Raw("--bundle <local copy of the card folder>"), "--quick"))
        found.notes.append(f"bundle {bundle.name} ({bundle.precision}) complete, {len(names)} files, "
                           f"{fmt_bytes(total)}" + ("" if short else ", sizes as on the model card"))
    others = [b.name for b in ctx.bundles if b is not bundle and TOKENIZER not in b.files]
    for name in others:
        found.warn(f"bundle {name} has no {TOKENIZER} (it cannot be served)", advice="push it again",
                   command=ctx.provision())


async def _against_local(ctx: PhoneContext, bundle: Bundle, found: Findings) -> None:
    """Sizes, then sha256 (of the files whose size matches), against the local copy."""
    assert ctx.plan is not None
    mine = [f for f in ctx.plan.files if f.rel.startswith(ctx.plan.name + "/")]
    wrong = []
    for f in mine:
        size = ctx.files.get(f.rel, (None, False))[0]
        if size is not None and size != f.size:
            wrong.append(f"{f.rel}: {size:,} bytes on the phone, {f.size:,} here")
    absent = [f.rel for f in mine if f.rel not in ctx.files]
    if absent:
        found.fail(f"{', '.join(absent)} not on the phone (in the local copy)", advice="push the bundle",
                   command=ctx.provision())
    if wrong:
        found.fail("size differs from the local copy: " + "; ".join(wrong), advice="push the bundle again",
                   command=ctx.provision())
    same = [f for f in mine if f.rel in ctx.files and ctx.files[f.rel][0] == f.size]
    if not same:
        return
    ctx.steps.step(ctx.serial, f"staging: sha256 of {len(same)} file(s) on the phone")
    # on the event loop, not in a worker thread: Ctrl-C during minutes of hashing stops it at once
    res = await ctx.shell(hash_command(ctx.root, [f.rel for f in same]),
                          timeout=hash_timeout(ctx.settings.adb_timeout_s, sum(f.size for f in same)))
    try:
        got = parse_hashes(res.exit_code, res.text())
    except Refused as e:
        found.warn(str(e), advice="compare by hand", command=ctx.adb_shell(f"ls -l {sh_quote(f'{ctx.root}/{bundle.name}')}"))
        return
    differ = [f.rel for f in same if got.get(f.rel) != f.sha256]
    if differ:
        found.fail(f"sha256 differs from the local copy: {', '.join(differ)}", advice="push the bundle again",
                   command=ctx.provision())
    else:
        found.notes.append(f"bundle {bundle.name} matches the local copy {ctx.options.local_bundle} "
                           f"(size and sha256 of {len(same)} files)")


def _leftovers(ctx: PhoneContext, found: Findings) -> None:
    parts = sorted(rel for rel in ctx.files if rel.endswith(PART))
    if parts:
        shown = ", ".join(parts[:3]) + ("..." if len(parts) > 3 else "")
        found.warn(f"{len(parts)} leftover {PART} file(s) of an interrupted provision ({shown})",
                   advice="run the provision again: it completes or replaces them", command=ctx.provision())
