"""``qhx-server doctor``: the command line (flags, progress on stderr, the report on stdout)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from server.cli import ArgumentParser
from server.ops.doctor.context import Options
from server.ops.doctor.runner import Ambiguous, doctor
from server.ops.progress import LiveProgress
from server.ops.provision import InvalidBundle, Plan, plan_files
from server.settings import Settings

# settings a doctor run may set (the rest of Settings is the HTTP server's)
SETTINGS_FLAGS = {
    "device_root": ("--device-root", str, "device root on the phone (default /data/local/tmp/wq)"),
    "adb_timeout_s": ("--adb-timeout-s", float, "socket timeout of each adb call (default 10)"),
    "ready_timeout_s": ("--ready-timeout-s", float, "how long a model load may take (default 60)"),
    "stall_timeout_s": ("--stall-timeout-s", float, "longest gap between two tokens (default 30)"),
    "launch_command": ("--launch-command", str, "phone command template (default: the model card's)"),
    "tokenizer_cache": ("--tokenizer-cache", str, "host cache of the phones' tokenizer.json"),
}


def _positive(kind: type[int | float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):  # inf would reach --json as Infinity (not JSON)
            raise argparse.ArgumentTypeError(f"{text} must be a finite number > 0")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qhx-server doctor",
        description="Check phones for serving, one line per check (pass / warn / fail, what was measured, "
        "the command to run next); see docs/doctor.md.",
        epilog="Exit status: 0 nothing failed (warnings allowed), 1 a check failed or no phone could be "
        "checked, 2 bad arguments (or several phones and neither --serial nor --all).")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--serial", action="append", default=[], metavar="S",
                     help="phone to check (repeatable; default: the only phone adb lists)")
    who.add_argument("--all", action="store_true", help="every phone adb lists, whatever its state")
    parser.add_argument("--bundle", metavar="NAME|DIR",
                        help="bundle on the phone to check (default: the one the server would serve), or a "
                        "local folder (the card's v81/ or v81-w8/): the phone's copy is then compared with it "
                        "by size and sha256")
    parser.add_argument("--json", action="store_true", help="print one JSON document (schema in docs/doctor.md)")
    parser.add_argument("--quick", action="store_true", help="skip the sustained decode run (check 7)")
    parser.add_argument("--parallel", type=_positive(int), default=4, metavar="N",
                        help="phones checked at once (default 4)")
    parser.add_argument("--health-seconds", type=_positive(float), default=20.0, metavar="S",
                        help="length of the sustained decode run (default 20)")
    parser.add_argument("--adb-server", dest="adb_servers", action="append", metavar="HOST:PORT",
                        help="adb server (repeatable; env QHX_ADB_SERVERS; default: the local one)")
    for dest, (flag, kind, text) in SETTINGS_FLAGS.items():
        parser.add_argument(flag, dest=dest, type=kind, help=f"{text} (env QHX_{dest.upper()})")
    return parser


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command stopped by Ctrl-C


def main(argv: list[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the command; returns the exit status (130 after Ctrl-C: the phones' processes are stopped,
    nothing is printed on stdout)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        return _main(argv, out, err)
    except KeyboardInterrupt:
        err.write("qhx-server doctor: interrupted (what runs on the phones was stopped)\n")
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None, out: TextIO, err: TextIO) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    given = {k: v for k in ("adb_servers", *SETTINGS_FLAGS) if (v := getattr(ns, k)) is not None}
    # every request starts from a reset: the checks compare runs, not what state reuse would save
    settings = Settings(**given).model_copy(update={"state_reuse": "off"})
    local = Path(ns.bundle) if ns.bundle and ("/" in ns.bundle or Path(ns.bundle).is_dir()) else None
    options = Options(serials=tuple(ns.serial), all_phones=ns.all, bundle=None if local else ns.bundle,
                      local_bundle=local, quick=ns.quick, health_s=ns.health_seconds, parallel=ns.parallel)
    with LiveProgress(err) as progress:
        logging.basicConfig(level=logging.WARNING, handlers=[progress.log_handler()], force=True)
        plan: Plan | None = None
        if local is not None:
            try:
                plan = plan_files(local, progress=progress)
            except (InvalidBundle, OSError) as e:
                progress.close()
                parser.exit(2, f"qhx-server doctor: {e}\n")
        try:
            report = asyncio.run(doctor(settings, options, progress, plan))
        except Ambiguous as e:
            progress.close()
            parser.exit(2, f"qhx-server doctor: {e}\n")
    if ns.json:
        out.write(json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n")
    else:
        out.write(report.render())
    out.flush()
    return report.exit_code
