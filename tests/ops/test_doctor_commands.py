"""The commands doctor tells users to run, run by a real POSIX shell: whatever the serial, the device
root or a bundle's folder name hold (spaces, quotes, ``$(...)``, backquotes, ``;``, globs, newlines),
each reaches the program as one whole argument and nothing in it is executed, on the host (``adb``,
``qhx-server``) and on the phone (the command after ``adb shell``, run by the phone's ``sh``).

The programs are stubs on PATH that record their arguments; the injections would write a canary file
with a shell redirection (no program needed), so a quoting slip shows either way.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.backends.adb.discovery import Bundle
from server.backends.adb.transport import AdbServerClient
from server.ops.doctor.adbcheck import NOT_LISTED, check_adb
from server.ops.doctor.context import Findings, OneShotRun, Options, PhoneContext
from server.ops.doctor.report import PhoneReport
from server.ops.doctor.runs import _failed, check_arch, repro
from server.ops.doctor.staging import _bundle_files, _choose_bundle, _leftovers, _runtime
from server.ops.progress import Steps
from server.settings import Settings

HOST_PROGRAMS = ("adb", "qhx-server", "env")
PHONE_PROGRAMS = ("chmod", "ls", "du", "mount", "grep", "getprop", "dumpsys", "head", "kill", "ps")
MANIFEST = "qwen3.5-0.8b-1024.json"
PLACEHOLDER = re.compile(r"<[a-z][\w .*/-]*>")


def hostile(canary: Path) -> list[str]:
    inject = f"echo x>{canary}"
    return [f"a b'c\"d$({inject})`{inject}`;{inject};e|f&g*h\\i\nj!k[l]{{m,n}}~o:5555", " x y ", "-x"]


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(stub bin folder, working folder with a file in it so that an unquoted glob would expand)."""
    bin_dir, work = tmp_path / "bin", tmp_path / "work"
    bin_dir.mkdir()
    work.mkdir()
    (work / "globbed").write_text("")
    stub = "#!/bin/sh\n{ printf '%s\\0' \"${0##*/}\" \"$@\"; printf '\\1'; } >> \"$ARGS\"\n"
    for name in (*HOST_PROGRAMS, *PHONE_PROGRAMS):
        (bin_dir / name).write_text(stub)
        (bin_dir / name).chmod(0o755)
    (work / "qhx_generate").write_text(stub)
    (work / "qhx_generate").chmod(0o755)
    yield bin_dir, work


def run(command: str, bin_dir: Path, work: Path, *, phone: bool) -> list[list[str]]:
    """Run ``command`` in sh with only the stubs on PATH; each stub call's argv."""
    log = work / "args"
    log.unlink(missing_ok=True)
    command = PLACEHOLDER.sub("PLACEHOLDER", command)  # <folder with ...>: the user's to fill in
    script = ("cd() { :; }; " if phone else "") + command  # the phone's device root is not here
    env = {"PATH": str(bin_dir), "ARGS": str(log), "HOME": str(work)}
    done = subprocess.run(["/bin/sh", "-c", script], check=False, cwd=work, env=env, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, (command, done.stderr)
    raw = log.read_bytes().decode() if log.exists() else ""
    return [call.split("\0")[:-1] for call in raw.split("\1")[:-1]]


def context(serial: str, root: str, bundle: str, state: str = "device") -> PhoneContext:
    settings = Settings(adb_servers=["127.0.0.1:41234"], device_root=root)
    client = AdbServerClient("127.0.0.1:41234", timeout=1)
    return PhoneContext(client, serial, state, settings, Options(bundle="not-there"), Steps(),
                        PhoneReport(serial, client.address, state))


async def suggested(serial: str, root: str, name: str) -> list[str]:
    """Every command doctor's checks suggest that can be reached without a phone, for these values."""
    commands: list[str | None] = []
    for state in (NOT_LISTED, "unauthorized"):
        commands.append((await check_adb(context(serial, root, name, state))).command)
    ctx = context(serial, root, name)
    ctx.report.soc = "SM8850"
    found = Findings()
    ctx.files = {f"{name}/{MANIFEST}": (100, False), f"{name}/x.bin.part": (1, False),
                 f"{name}2/{MANIFEST}": (100, False)}
    await _choose_bundle(ctx, found)  # --bundle not-there: "name one of the phone's bundles"
    _runtime(ctx, found)  # no runtime, no QNN libs
    ctx.files["qhx_generate"] = (10, False)
    _runtime(ctx, found)  # not executable
    _leftovers(ctx, found)
    ctx.bundle = Bundle(name, MANIFEST, "qwen3.5-0.8b", 1024, "fp16", [MANIFEST])
    ctx.bundles = [ctx.bundle, Bundle(name + "2", MANIFEST, "qwen3.5-0.8b", 1024, "fp16", [MANIFEST])]
    ctx.manifest = {"graphs": {"decode": "qwen3508b_decode_f16.bin"}, "arch": "v79", "soc_model": "SM8750"}
    ctx.files[f"{name}/qwen3508b_decode_f16.bin"] = (1000, False)
    await _bundle_files(ctx, ctx.bundle, found)  # short against the card, tokenizer missing
    commands += [p.command for p in found.fails + found.warns]
    commands.append((await check_arch(ctx)).command)  # the phone's other bundle
    by_hand = repro(ctx, ctx.launcher().command(ctx.bundle, "The capital of France is", 32))
    for code in (None, 126, 1):
        run_ = OneShotRun(b"", [], code, None, None, 0, 1.0)
        commands.append(_failed(ctx, run_, by_hand, [], {}).command)
    commands.append(by_hand)
    assert all(commands)
    return [c for c in commands if c]


async def test_every_suggested_command_keeps_hostile_values_whole_on_the_host_and_on_the_phone(
        shell: tuple[Path, Path], tmp_path: Path) -> None:
    bin_dir, work = shell
    canary = tmp_path / "canary"
    for value in hostile(canary):
        serial, root, name = f"SER{value}", f"/data/local/tmp/ROOT{value}", f"BUN{value}"
        whole = {"SER": serial, "ROOT": root, "BUN": name}
        for command in await suggested(serial, root, name):
            calls = run(command, bin_dir, work, phone=False)
            assert calls, command
            for call in list(calls):
                if call[0] == "adb" and "shell" in call:  # what the phone's sh would run: checked there
                    phone_command = call.pop(call.index("shell") + 1)
                    calls += run(phone_command, bin_dir, work, phone=True)
            for call in calls:
                for arg in call:
                    for tag, full in whole.items():
                        if tag in arg:
                            assert full in arg, (command, call)
            assert not canary.exists(), command
