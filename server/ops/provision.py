"""`qhx-server provision`: push a model bundle (and the runtime) to phones, resumable and verified.

For each phone (several at once, ``--parallel`` bounds how many: a bench of phones on several USB
hubs is limited by each link, not by the host):

1. refuse it, before anything is written, when its SoC (``getprop`` ro.soc.model) cannot run the
   bundle's Hexagon arch (discovery's table and check);
2. compare: a file whose phone copy has the local size (sync STAT) and sha256 (the phone's
   ``sha256sum``) is skipped; so is a complete ``<file>.part`` left by an interrupted run, which is
   only renamed;
3. push every other file to ``<file>.part``, check its sha256 on the phone, rename it over the file;
4. verify: the sha256 of every file on the phone against the local one.

Resuming is per file: adb sync SEND has no offset, so a file cut off by an unplug is sent again
whole on the next run, while every file completed before it is skipped. While a bundle is being
changed its manifest is kept out of the way (renamed to ``.part`` or removed, put back last), so a
half-provisioned bundle is never discovered as servable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import stat
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from server.backends.adb.discovery import (
    DEFAULT_BUNDLE,
    SOC_ARCH,
    TOKENIZER,
    arch_mismatch,
    parse_bundles,
    parse_props,
)
from server.backends.adb.quoting import sh_quote
from server.backends.adb.transport import AdbServerClient, format_server, resolve_adb_servers
from server.cli import ArgumentParser
from server.errors import PhoneLost
from server.ops.devicefs import PushRefused, list_devices, push, shell, stat_sizes
from server.ops.progress import LiveProgress, Progress, fmt_bytes
from server.settings import Settings

logger = logging.getLogger(__name__)

RUNTIME_EXE = "qhx_generate"
PART = ".part"
# what a slow phone's sha256sum reads per second (sets the hashing timeouts, not the speed)
PHONE_HASH_BYTES_PER_S = 20e6
PARALLEL = 4  # phones provisioned at once by default
_SHA_LINE = re.compile(r"^\\?(?P<sha>[0-9a-fA-F]{64}) [ *](?P<name>.+)$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+-]+$")


class InvalidBundle(ValueError):
    """The local bundle or runtime folder cannot be provisioned (nothing was sent anywhere)."""


class Refused(Exception):
    """This phone cannot take the bundle, or a check failed; the message says why."""


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A file to put on phones: ``rel`` is its path under the device root (``qwen35/tokenizer.json``)."""

    rel: str
    path: Path
    size: int
    sha256: str
    executable: bool


@dataclass(slots=True)
class Plan:
    """What to push: files in push order (runtime, bundle data, the manifest last)."""

    name: str  # the bundle's folder on the phone, e.g. qwen35
    precision: str  # fp16 | w8
    manifest: LocalFile
    arch: dict[str, str]  # the arch fields discovery.arch_mismatch reads; empty: the bundle does not say
    files: list[LocalFile]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(slots=True)
class PhoneReport:
    """What happened on one phone. ``error`` None: every file is on the phone and verified."""

    serial: str
    server: str
    soc: str | None = None
    product: str | None = None
    pushed: list[str] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)  # complete .part files found and put in place
    skipped: list[str] = field(default_factory=list)
    verified: int = 0
    bytes_sent: int = 0  # including a push cut short
    push_seconds: float = 0.0
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------- the local side


def _sha256(path: Path, progress: Progress) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            progress.advance(len(chunk))
    return h.hexdigest()


def _regular_files(folder: Path) -> list[Path]:
    """Top-level regular files, sorted; hidden ones (``.cache/`` of hf download, .DS_Store) left out."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_file():
            logger.warning("%s: not a regular file, left out", entry)
            continue
        if not _SAFE_NAME.match(entry.name) or entry.name.endswith(PART):
            raise InvalidBundle(f"{entry}: file name not pushed as is (letters, digits, . _ + - only)")
        files.append(entry)
    return files


def bundle_arch(manifest: dict[str, Any], folder: str) -> dict[str, str]:
    """The arch fields for ``arch_mismatch``: the manifest's ``arch`` (or ``dsp_arch``) and
    ``soc_model``; when it names neither, the folder name of the model card (``v81``, ``v81-w8``)."""
    arch = manifest.get("arch") or manifest.get("dsp_arch")
    if isinstance(arch, int) or (isinstance(arch, str) and arch.isdigit()):
        arch = f"v{arch}"
    soc_model = manifest.get("soc_model")
    if not arch and not soc_model:
        m = re.match(r"^(v\d+)(?:-|$)", folder)
        arch = m[1] if m else None
    return {k: str(v) for k, v in (("arch", arch), ("soc_model", soc_model)) if v}


def plan_files(bundle_dir: Path, runtime_dir: Path | None = None, *, name: str | None = None,
               progress: Progress | None = None) -> Plan:
    """Read and hash the local files (InvalidBundle when they cannot be a bundle)."""
    progress = progress or Progress()
    if not bundle_dir.is_dir():
        raise InvalidBundle(f"--bundle {bundle_dir}: not a folder")
    bundle_files = _regular_files(bundle_dir)
    found = parse_bundles([f"b/{p.name}" for p in bundle_files])
    if not found:
        raise InvalidBundle(f"--bundle {bundle_dir}: no <family>-<N>.json manifest "
                            "(e.g. qwen3.5-0.8b-1024.json)")
    bundle = found[0]
    if TOKENIZER not in bundle.files:
        raise InvalidBundle(f"--bundle {bundle_dir}: no {TOKENIZER} (the server needs it to serve)")
    dest = name if name is not None else (DEFAULT_BUNDLE if bundle.precision == "fp16"
                                          else f"{DEFAULT_BUNDLE}-{bundle.precision}")
    if not _SAFE_NAME.match(dest) or dest in (".", ".."):
        raise InvalidBundle(f"--name {dest!r}: one folder name (letters, digits, . _ + - only)")
    manifest_path = bundle_dir / bundle.manifest
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidBundle(f"{manifest_path}: not a readable JSON manifest: {e}") from e
    if not isinstance(manifest, dict):
        raise InvalidBundle(f"{manifest_path}: not a JSON object")

    sources: list[tuple[str, Path]] = []
    if runtime_dir is not None:
        if not runtime_dir.is_dir():
            raise InvalidBundle(f"--runtime {runtime_dir}: not a folder")
        runtime_files = _regular_files(runtime_dir)
        if RUNTIME_EXE not in [p.name for p in runtime_files]:
            raise InvalidBundle(f"--runtime {runtime_dir}: no {RUNTIME_EXE}")
        clash = [p.name for p in runtime_files if p.name == dest]
        if clash:
            raise InvalidBundle(f"--runtime {runtime_dir}: {clash[0]} would collide with the bundle folder")
        sources += [(p.name, p) for p in runtime_files]
    sources += [(f"{dest}/{p.name}", p) for p in bundle_files if p.name != bundle.manifest]
    sources.append((f"{dest}/{bundle.manifest}", manifest_path))

    sizes = {rel: path.stat().st_size for rel, path in sources}
    progress.begin("hashing local files", len(sources), sum(sizes.values()), file_lines=False)
    files = []
    try:
        for rel, path in sources:
            progress.start_file(rel, sizes[rel])
            sha = _sha256(path, progress)
            progress.end_file(True)
            executable = path.name == RUNTIME_EXE or bool(path.stat().st_mode & stat.S_IXUSR)
            files.append(LocalFile(rel, path, sizes[rel], sha, executable and "/" not in rel))
    finally:
        progress.end()
    return Plan(dest, bundle.precision, files[-1], bundle_arch(manifest, bundle_dir.name), files)


# --------------------------------------------------------------------------- one phone


def _hashes(client: AdbServerClient, serial: str, root: str, rels: Iterable[str], nbytes: int,
            timeout: float) -> dict[str, str]:
    """rel -> sha256 from the phone's ``sha256sum`` (files it cannot read are left out)."""
    rels = list(rels)
    if not rels:
        return {}
    res = shell(client, serial, hash_command(root, rels), timeout=hash_timeout(timeout, nbytes))
    return parse_hashes(res.exit_code, res.text())


def hash_command(root: str, rels: Iterable[str]) -> str:
    """The phone command hashing ``rels`` (paths under ``root``) with ``sha256sum``."""
    return f"cd {sh_quote(root)} && sha256sum " + " ".join(sh_quote("./" + r) for r in rels)


def hash_timeout(timeout: float, nbytes: int) -> float:
    """How long hashing ``nbytes`` on a slow phone may take."""
    return timeout + nbytes / PHONE_HASH_BYTES_PER_S


def parse_hashes(exit_code: int | None, text: str) -> dict[str, str]:
    """rel -> sha256 from the output of :func:`hash_command` (Refused when the phone has no sha256sum)."""
    if exit_code == 127:
        raise Refused("the phone has no sha256sum (toybox has it since Android 6); cannot verify")
    found = {}
    for line in text.splitlines():
        m = _SHA_LINE.match(line)
        if m:
            found[m["name"].removeprefix("./")] = m["sha"].lower()
    return found


def _run(client: AdbServerClient, serial: str, command: str, timeout: float) -> None:
    res = shell(client, serial, command, timeout=timeout)
    if not res.ok:
        why = (res.stderr or res.stdout).decode("utf-8", "replace").strip()
        raise Refused(f"`{command}` failed (exit {res.exit_code}): {why}")


class _PhoneJob:
    """Provisioning of one phone: the steps of the module docstring, in order."""

    def __init__(self, client: AdbServerClient, serial: str, plan: Plan, root: str, timeout: float,
                 progress: Progress) -> None:
        self.client, self.serial, self.plan = client, serial, plan
        self.root, self.timeout, self.progress = root, timeout, progress
        self.report = PhoneReport(serial, client.address)

    def run(self) -> PhoneReport:
        started = time.monotonic()
        try:
            self.check_soc()
            state = self.compare()
            self.transfer(state)
            # when nothing changed, the comparison just hashed every file: that was the verification
            self.verify(rehash=any(s != "ok" for s in state.values()))
        except (Refused, PhoneLost, PushRefused) as e:
            self.report.error = str(e)
        self.report.seconds = time.monotonic() - started
        return self.report

    def sh(self, command: str) -> None:
        _run(self.client, self.serial, f"cd {sh_quote(self.root)} && {command}", self.timeout)

    def check_soc(self) -> None:
        res = shell(self.client, self.serial, "getprop", timeout=self.timeout)
        props = parse_props(res.text())
        self.report.soc = props.get("ro.soc.model") or None
        self.report.product = props.get("ro.product.model") or None
        if not self.plan.arch:
            self.progress.note("the bundle does not say its Hexagon arch; SoC not checked")
            return
        why = arch_mismatch(self.plan.arch, self.report.soc)
        if why:
            known = ", ".join(f"{soc}={arch}" for soc, arch in SOC_ARCH.items())
            raise Refused(f"refused, nothing pushed: {why} (known SoCs: {known})")

    def compare(self) -> dict[str, str]:
        """rel -> "ok" (in place), "part" (complete .part to rename) or "push"."""
        files = self.plan.files
        paths = [f"{self.root}/{f.rel}{suffix}" for f in files for suffix in ("", PART)]
        sizes = stat_sizes(self.client, self.serial, paths, timeout=self.timeout)
        # sync STAT v1 sizes are u32
        candidates = {f"{f.rel}{suffix}": f.size for f in files for suffix in ("", PART)
                      if sizes[f"{self.root}/{f.rel}{suffix}"] == f.size & 0xFFFFFFFF}
        found = _hashes(self.client, self.serial, self.root, candidates, sum(candidates.values()),
                        self.timeout)
        state = {}
        for f in files:
            if found.get(f.rel) == f.sha256:
                state[f.rel] = "ok"
            elif found.get(f.rel + PART) == f.sha256:
                state[f.rel] = "part"
            else:
                state[f.rel] = "push"
        manifest = self.plan.manifest
        bundle_changes = any(state[f.rel] != "ok" for f in files
                             if f.rel.startswith(self.plan.name + "/") and f is not manifest)
        if bundle_changes and sizes[f"{self.root}/{manifest.rel}"] is not None:
            # hide the bundle from discovery until all of it is in place
            q = sh_quote("./" + manifest.rel)
            if state[manifest.rel] == "ok":
                self.sh(f"mv -f {q} {sh_quote('./' + manifest.rel + PART)}")
                state[manifest.rel] = "part"
            else:
                self.sh(f"rm -f {q}")
        return state

    def transfer(self, state: dict[str, str]) -> None:
        todo = [f for f in self.plan.files if state[f.rel] == "push"]
        for f in self.plan.files:
            if state[f.rel] == "ok":
                self.report.skipped.append(f.rel)
                self.progress.note(f"up to date  {f.rel}")
        if todo:  # the device root itself may not exist yet
            _run(self.client, self.serial, f"mkdir -p {sh_quote(self.root + '/' + self.plan.name)}",
                 self.timeout)
        self.progress.begin("push", len(todo), sum(f.size for f in todo))
        try:
            for f in self.plan.files:
                if state[f.rel] == "part":
                    self.put_in_place(f)
                    self.report.renamed.append(f.rel)
                    self.progress.note(f"completed   {f.rel} (a verified {f.rel}{PART} was on the phone)")
                elif state[f.rel] == "push":
                    self.push_one(f)
                    self.report.pushed.append(f.rel)
        finally:
            self.progress.end()

    def push_one(self, f: LocalFile) -> None:
        self.progress.start_file(f.rel, f.size)
        report = self.report

        def sent(n: int) -> None:
            report.bytes_sent += n
            self.progress.advance(n)

        ok = False
        try:
            started = time.monotonic()
            try:
                push(self.client, self.serial, f.path, f"{self.root}/{f.rel}{PART}",
                     mode=0o755 if f.executable else 0o644, timeout=self.timeout, on_bytes=sent)
            finally:
                report.push_seconds += time.monotonic() - started
            got = _hashes(self.client, self.serial, self.root, [f.rel + PART], f.size, self.timeout)
            if got.get(f.rel + PART) != f.sha256:
                raise Refused(f"{f.rel}: sha256 on the phone differs from the local file after the push "
                              f"(phone: {got.get(f.rel + PART, 'unreadable')})")
            self.put_in_place(f)
            ok = True
        finally:
            self.progress.end_file(ok)

    def put_in_place(self, f: LocalFile) -> None:
        q = sh_quote("./" + f.rel)
        self.sh(f"mv -f {sh_quote('./' + f.rel + PART)} {q}" + (f" && chmod 755 {q}" if f.executable else ""))

    def verify(self, *, rehash: bool = True) -> None:
        files = self.plan.files
        if rehash:
            found = _hashes(self.client, self.serial, self.root, [f.rel for f in files],
                            self.plan.total_bytes, self.timeout)
            bad = [f.rel for f in files if found.get(f.rel) != f.sha256]
            if bad:
                raise Refused("verification failed, sha256 differs or unreadable on the phone: "
                              + ", ".join(bad))
        executables = [sh_quote("./" + f.rel) for f in files if f.executable]
        if executables:  # also when skipped: a hand-pushed copy may have lost its mode
            self.sh("chmod 755 " + " ".join(executables))
        self.report.verified = len(files)


# --------------------------------------------------------------------------- phones


class NoPhone(Exception):
    """The phones to provision cannot be chosen (none, or several and no --serial/--all)."""


def select_phones(settings: Settings, serials: list[str], all_phones: bool
                  ) -> tuple[list[tuple[AdbServerClient, str]], list[PhoneReport]]:
    """(phones to provision, reports of requested phones that cannot be), over every adb server."""
    listed: dict[str, tuple[AdbServerClient, str]] = {}
    unreachable = []
    for host, port in resolve_adb_servers(settings):
        client = AdbServerClient(format_server(host, port), timeout=settings.adb_timeout_s)
        try:
            states = list_devices(client)
        except PhoneLost as e:
            unreachable.append(str(e))
            continue
        for serial, state in states.items():
            listed.setdefault(serial, (client, state))
    if unreachable and not listed:
        raise NoPhone("; ".join(unreachable))
    for why in unreachable:
        logger.warning("%s", why)
    ready = [(client, s) for s, (client, state) in listed.items() if state == "device"]
    if serials:
        chosen, failed = [], []
        for serial in dict.fromkeys(serials):
            if serial not in listed:
                failed.append(PhoneReport(serial, "-", error="not listed by the adb server(s)"))
            elif listed[serial][1] != "device":
                failed.append(PhoneReport(serial, listed[serial][0].address,
                                          error=f"adb state is {listed[serial][1]!r}, not 'device'"))
            else:
                chosen.append((listed[serial][0], serial))
        return chosen, failed
    if not ready:
        raise NoPhone("no phone in adb state 'device'" + (f" (listed: {listed_states(listed)})" if listed else ""))
    if all_phones or len(ready) == 1:
        return ready, []
    raise NoPhone(f"{len(ready)} phones attached ({', '.join(s for _, s in ready)}): "
                  "choose with --serial S or take them all with --all")


def listed_states(listed: dict[str, tuple[AdbServerClient, str]]) -> str:
    return ", ".join(f"{serial} {state}" for serial, (_, state) in listed.items())


def provision(plan: Plan, settings: Settings, *, serials: list[str] | None = None, all_phones: bool = False,
              progress: Progress | None = None, parallel: int = PARALLEL) -> list[PhoneReport]:
    """Provision the chosen phones, at most ``parallel`` at once (one thread each, each with its own
    progress view); a report per phone, in the order chosen. NoPhone if none is chosen."""
    if parallel < 1:
        raise ValueError("parallel must be >= 1")
    progress = progress or Progress()
    phones, reports = select_phones(settings, serials or [], all_phones)
    root = settings.device_root.rstrip("/") or "/"
    jobs = [_PhoneJob(client, serial, plan, root, settings.adb_timeout_s, progress.phone(serial))
            for client, serial in phones]
    reports.extend(_run_jobs(jobs, parallel))
    return reports


def _run_jobs(jobs: list[_PhoneJob], parallel: int) -> list[PhoneReport]:
    """Each phone's job in a thread of its own, at most ``parallel`` at once; the reports in job order
    (a job's exception is raised here). Daemon threads: Ctrl-C ends the command at once, instead of
    waiting minutes for every push and phone-side hash to finish (a pool's threads are joined at exit);
    the process's adb streams close with it, which stops the phones' side, and a push cut short leaves
    a .part file that the next provision resumes."""
    gate = threading.Semaphore(parallel)
    results: list[PhoneReport | BaseException | None] = [None] * len(jobs)

    def work(i: int, job: _PhoneJob) -> None:
        with gate:
            try:
                results[i] = job.run()
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                results[i] = e

    threads = [threading.Thread(target=work, args=(i, job), name=f"qhx-provision-{job.serial}", daemon=True)
               for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()  # a Ctrl-C interrupts it (KeyboardInterrupt in this thread)
    reports = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        reports.append(result)
    return reports


# --------------------------------------------------------------------------- the command


def summary_line(r: PhoneReport) -> str:
    who = " ".join(x for x in (r.serial, r.product, r.soc) if x)
    if r.ok:
        rate = f", {fmt_bytes(r.bytes_sent / r.push_seconds)}/s" if r.push_seconds > 0 else ""
        return (f"{who}: ok, pushed {len(r.pushed)} ({fmt_bytes(r.bytes_sent)}{rate}), "
                f"up to date {len(r.skipped)}, renamed {len(r.renamed)}, verified {r.verified}, "
                f"{r.seconds:.1f} s")
    done = f" [pushed {len(r.pushed)} file(s) before that]" if r.pushed else ""
    return f"{who}: FAILED: {r.error}{done}"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qhx-server provision",
        description="Push a model bundle (and the runtime) to phones, resumable and verified; "
        "see docs/provisioning.md.",
        epilog="Exit status: 0 every phone provisioned and verified, 1 any phone failed, 2 bad arguments, "
        "130 Ctrl-C (run it again to resume).")
    parser.add_argument("--bundle", type=Path, required=True, metavar="DIR",
                        help="local bundle folder, e.g. the model card's v81/ or v81-w8/")
    parser.add_argument("--runtime", type=Path, metavar="DIR",
                        help="also push this folder's files (qhx_generate, libQnn*.so) to the device root")
    parser.add_argument("--name", help="bundle folder on the phone (default: qwen35 for fp16, qwen35-w8 for w8)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--serial", action="append", default=[], metavar="S",
                     help="phone to provision (repeatable; default: the only phone attached)")
    who.add_argument("--all", action="store_true", help="every phone in state 'device'")
    parser.add_argument("--parallel", type=_positive, default=PARALLEL, metavar="N",
                        help=f"phones provisioned at once (default {PARALLEL})")
    parser.add_argument("--device-root", help="device root on the phone (env QHX_DEVICE_ROOT; "
                        "default /data/local/tmp/wq)")
    parser.add_argument("--adb-server", dest="adb_servers", action="append", metavar="HOST:PORT",
                        help="adb server (repeatable; env QHX_ADB_SERVERS; default: the local one)")
    parser.add_argument("--adb-timeout-s", type=float,
                        help="socket timeout of each adb send/receive (env QHX_ADB_TIMEOUT_S; default 10)")
    return parser


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def main(argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command; returns the exit status (130 after Ctrl-C)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        return _main(argv, out, err)
    except KeyboardInterrupt:
        err.write("qhx-server provision: interrupted; a file cut short stays a .part file on the phone (hidden "
                  "from serving): run the same command again to resume\n")
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None, out: TextIO, err: TextIO) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=err, format="%(levelname)s %(message)s")
    given = {k: v for k in ("device_root", "adb_servers", "adb_timeout_s") if (v := getattr(ns, k)) is not None}
    settings = Settings(**given)
    with LiveProgress(err) as progress:
        try:
            plan = plan_files(ns.bundle, ns.runtime, name=ns.name, progress=progress)
        except (InvalidBundle, OSError) as e:
            progress.close()
            parser.exit(2, f"qhx-server provision: {e}\n")
        progress.note(f"bundle {ns.bundle} ({plan.precision}) -> {settings.device_root}/{plan.name}/, "
                      f"{len(plan.files)} file(s), {fmt_bytes(plan.total_bytes)}")
        try:
            reports = provision(plan, settings, serials=ns.serial, all_phones=ns.all, progress=progress,
                                parallel=ns.parallel)
        except NoPhone as e:
            progress.close()
            err.write(f"qhx-server provision: {e}\n")
            return 1
    out.writelines(summary_line(r) + "\n" for r in reports)
    out.flush()
    return 0 if reports and all(r.ok for r in reports) else 1
