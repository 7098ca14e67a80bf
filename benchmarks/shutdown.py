"""SIGTERM with streams in flight: how `qhx-server serve` ends (docs/reliability.md, "Shutdown").

    python benchmarks/shutdown.py [--phones 8] [--streams 8] [--grace-s 30] [--second-signal-s S]

``qhx-server serve --sim N`` (one process: its simulated phones and their private adb server are
its children) at the phones' real rate; ``--streams`` streamed completions of 1,000 tokens
(``ignore_eos``, ~44 s each) start, then SIGTERM (and, with ``--second-signal-s``, SIGINT that many
seconds later). Printed: seconds from SIGTERM to exit, the exit status, how each stream ended
([DONE] or the error code of its last event), and the server's descendants still running after it.

Target (issue 13): with 8 streams, all end with [DONE] or a clean error, exit 0, no phone process
left, within the grace period + 2 s.
"""

from __future__ import annotations

import argparse
import collections
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stack import machine_info

from tests.test_shutdown import Stream, descendants, reap, start_server, still_alive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=8)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--grace-s", type=float, default=30.0)
    parser.add_argument("--second-signal-s", type=float, default=None)
    args = parser.parse_args()
    print(machine_info())
    proc, base = start_server(["--sim", str(args.phones), "--shutdown-grace-s", str(args.grace_s),
                               "--max-queue", str(max(64, args.streams))])
    streams = [Stream(base, max_tokens=1000) for _ in range(args.streams)]
    for s in streams:
        s.start()
    for s in streams[: args.phones]:
        s.started.wait(60)
    time.sleep(1)
    started = descendants(proc.pid)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    if args.second_signal_s is not None:
        time.sleep(args.second_signal_s)
        proc.send_signal(signal.SIGINT)
    try:
        code: int | str = proc.wait(args.grace_s + 60)
    except subprocess.TimeoutExpired:
        code = "still running"
        proc.kill()
    exited = time.monotonic() - t0
    for s in streams:
        s.join(10)
    left = still_alive(started)
    reap(started)
    endings = collections.Counter(s.ending for s in streams)
    tokens = [max(0, len(s.lines) - 1) for s in streams]
    signals = "SIGTERM" + (f", SIGINT {args.second_signal_s:g} s later" if args.second_signal_s is not None else "")
    print(f"{args.streams} streams on {args.phones} phones, grace {args.grace_s:g} s, {signals}: exit {code} "
          f"after {exited:.2f} s (grace + {exited - args.grace_s:+.2f} s)")
    print(f"stream endings: {dict(endings)}; events each before the end: min {min(tokens)}, max {max(tokens)}")
    print(f"processes the server started ({len(started)}) still running after it: {len(left)} {left}")
    clean = set(endings) <= {"done", "server_shutting_down"}
    return 0 if code == 0 and clean and not left else 1


if __name__ == "__main__":
    sys.exit(main())
