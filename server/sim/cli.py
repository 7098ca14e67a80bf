"""`qhx-server sim`: run simulated phones until Ctrl-C.

Two modes:

* default: a private adb server (free port) with N phones connected to it; point a server or the
  adb CLI at it with ``ANDROID_ADB_SERVER_PORT=<port>`` (printed).
* ``--listen HOST:PORT``: phones on consecutive ports from PORT, for *your* adb server to
  ``adb connect``; add ``--adb`` to also start and connect a private adb server.

A simulated phone runs shell commands as the current user (its sandbox is a folder, not a jail), so
it only listens on loopback addresses.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import math
import re
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType

from server.cli import ArgumentParser
from server.sim.harness import SimLab

LOG_LEVELS = ("debug", "info", "warning", "error")


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port in 1-65535, got {text!r}")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise argparse.ArgumentTypeError("simulated phones give a shell on this machine: loopback only")
    return ("127.0.0.1" if host == "localhost" else host), int(port)


def _slots(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return int(text)


def _speed(text: str) -> float:
    try:
        speed = float(text)
    except ValueError:
        speed = -1.0
    if not math.isfinite(speed) or speed < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return speed


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="qhx-server sim", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phones", type=int, default=1, help="number of phones (default 1)")
    parser.add_argument("--listen", type=_listen_address, metavar="HOST:PORT",
                        help="serve phones on consecutive ports from here, for your own adb server")
    parser.add_argument("--adb", action="store_true",
                        help="with --listen: also start a private adb server and connect the phones")
    parser.add_argument("--precision", choices=("fp16", "w8", "both"), default="fp16",
                        help="bundles staged on each phone (default fp16)")
    parser.add_argument("--soc", default="SM8850", help="ro.soc.model of the phones (default SM8850)")
    parser.add_argument("--speed", type=_speed, default=1.0,
                        help="simulated speed factor, 0 = as fast as possible (default 1)")
    parser.add_argument("--checkpoints", type=_slots, default=4, metavar="N",
                        help="checkpoint slots per phone (session protocol v1.1); 0 = a v1 runtime (default 4)")
    parser.add_argument("--workdir", type=Path,
                        help="folder for sandboxes and adb files (default: a temp dir, removed on exit)")
    parser.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info",
                        help="debug, info, warning, error (default info)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the phones until SIGINT or SIGTERM; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.phones < 1:
        build_parser().error("--phones must be at least 1")
    if args.listen and args.listen[1] + args.phones - 1 > 65535:
        build_parser().error(f"--listen: {args.phones} phone(s) from port {args.listen[1]} go past 65535")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, base_port = args.listen if args.listen else ("127.0.0.1", None)
    lab = SimLab(args.phones, precision=args.precision, soc=args.soc, speed=args.speed, workdir=args.workdir,
                 private_adb=args.listen is None or args.adb, host=host, base_port=base_port,
                 checkpoints=args.checkpoints)

    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # the banner (read by read_banner(): scripts and tests that start `qhx-server sim` in a process)
    try:
        with lab:
            for phone in lab.phones:
                print(f"{phone.serial}  {phone.props['ro.product.model']}  sandbox {phone.sandbox}")
            for phone in lab.phones:
                print(f"adb connect {phone.serial}")
            if lab.private_adb:
                print(f"private adb server on {lab.adb_server}: "
                      f"export ANDROID_ADB_SERVER_PORT={lab.adb_port}; adb devices -l")
            print("Ctrl-C to stop", flush=True)
            stop.wait()
    except OSError as exc:  # a port of --listen taken: say so, not a traceback
        if exc.errno != errno.EADDRINUSE:
            raise
        print(f"qhx-server sim: {exc.strerror or exc} (--listen: choose other ports)", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def read_banner(lines: Iterable[str]) -> tuple[str | None, list[Path]]:
    """What a ``qhx-server sim`` process printed before "Ctrl-C to stop": its private adb server
    ("host:port", None without one) and the phones' sandboxes. Reads ``lines`` (its stdout) up to that
    line and no further, so that the process keeps running."""
    adb_server, sandboxes = None, []
    for line in lines:
        if m := re.search(r"sandbox (\S+)", line):
            sandboxes.append(Path(m.group(1)))
        if m := re.search(r"private adb server on (\S+):", line):
            adb_server = m.group(1)
        if "Ctrl-C" in line:
            break
    return adb_server, sandboxes
