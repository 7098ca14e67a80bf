"""Measure the simulated phone's adb link on this machine: line latency, round trip, throughput.

    python benchmarks/adb_link.py [--lines 500] [--mb 50]

Line latency: a Python one-liner on the phone prints CLOCK_MONOTONIC per line; the host reads the
lines through adbutils and subtracts (phone and host share the clock). Round trip: one line written
to a `cat` over a long-lived shell,v2,raw stream and read back, as the session protocol does.
Throughput: `head -c` through a shell v2 stream, and adbutils sync push/pull. Kill latency: host
closes a stream running `sleep`, time until the phone process is gone.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import struct
import sys
import time
from pathlib import Path

import adbutils

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.sim.harness import SimLab

MB = 1024 * 1024


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"nproc {len(os.sched_getaffinity(0))}, {cpu}, load {load}, Python {platform.python_version()}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(name: str, ms: list[float]) -> None:
    print(f"{name:<48} median {statistics.median(ms):7.3f} ms  p99 {pct(ms, 0.99):7.3f} ms  "
          f"max {max(ms):7.3f} ms  (n={len(ms)})")


def read_v2(conn: adbutils.AdbConnection) -> tuple[int, bytes]:
    packet_id, length = struct.unpack("<BI", conn.read_exact(5))
    return packet_id, conn.read_exact(length)


def ticker(lines: int, gap_s: float) -> str:
    code = ("import sys,time\n"
            f"for _ in range({lines}):\n"
            "    sys.stdout.write('%d\\n' % time.monotonic_ns()); sys.stdout.flush()\n"
            f"    time.sleep({gap_s})\n")
    return f"{shlex.quote(sys.executable)} -S -c {shlex.quote(code)}"


def line_latency_v1(device: adbutils.AdbDevice, lines: int) -> list[float]:
    conn = device.shell(ticker(lines, 0.002), stream=True)
    latencies = []
    with conn, conn.conn.makefile("rb") as out:
        for line in out:
            latencies.append((time.monotonic_ns() - int(line)) / 1e6)
    return latencies


def line_latency_v2(device: adbutils.AdbDevice, lines: int) -> list[float]:
    latencies = []
    with device.open_transport() as conn:
        conn.send_command("shell,v2,raw:" + ticker(lines, 0.002))
        conn.check_okay()
        pending = b""
        while True:
            packet_id, data = read_v2(conn)
            now = time.monotonic_ns()
            if packet_id == 3:
                return latencies
            if packet_id == 1:
                pending += data
                *complete, pending = pending.split(b"\n")
                latencies += [(now - int(stamp)) / 1e6 for stamp in complete]


def round_trip_v2(device: adbutils.AdbDevice, count: int) -> list[float]:
    rtts = []
    with device.open_transport() as conn:
        conn.send_command("shell,v2,raw:cat")
        conn.check_okay()
        for i in range(count):
            line = b'{"op":"ping","id":"%d"}\n' % i
            started = time.perf_counter()
            conn.send(struct.pack("<BI", 0, len(line)) + line)
            received = b""
            while not received.endswith(b"\n"):
                packet_id, data = read_v2(conn)
                if packet_id == 1:
                    received += data
            rtts.append((time.perf_counter() - started) * 1e3)
        conn.send(struct.pack("<BI", 4, 0))
        while read_v2(conn)[0] != 3:
            pass
    return rtts


def stream_throughput(device: adbutils.AdbDevice, megabytes: int) -> float:
    with device.open_transport() as conn:
        conn.send_command(f"shell,v2,raw:head -c {megabytes * MB} /dev/zero")
        conn.check_okay()
        started, total = time.perf_counter(), 0
        while True:
            packet_id, data = read_v2(conn)
            if packet_id == 3:
                break
            total += len(data)
        elapsed = time.perf_counter() - started
    assert total == megabytes * MB, total
    return total / MB / elapsed


def sync_throughput(device: adbutils.AdbDevice, megabytes: int) -> tuple[float, float]:
    payload = os.urandom(megabytes * MB)
    started = time.perf_counter()
    device.sync.push(payload, "/data/local/tmp/bench.bin")
    push = megabytes / (time.perf_counter() - started)
    started = time.perf_counter()
    back = device.sync.read_bytes("/data/local/tmp/bench.bin")
    pull = megabytes / (time.perf_counter() - started)
    assert back == payload
    device.shell("rm /data/local/tmp/bench.bin")
    return push, pull


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def kill_latency(device: adbutils.AdbDevice, trials: int) -> list[float]:
    results = []
    for _ in range(trials):
        conn = device.shell("echo $$; exec sleep 30", stream=True)
        with conn.conn.makefile("rb") as out:
            pid = int(out.readline())
        started = time.perf_counter()
        conn.conn.close()  # adbutils' close() sleeps 10 ms first; measure the bare close
        while alive(pid):
            time.sleep(0.0005)
        results.append((time.perf_counter() - started) * 1e3)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=500, help="lines for the latency runs (default 500)")
    parser.add_argument("--mb", type=int, default=50, help="megabytes for the throughput runs (default 50)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    with SimLab(phones=1, speed=0) as lab:
        device = adbutils.AdbClient(port=lab.adb_port, socket_timeout=60).device(lab.phones[0].serial)
        print(f"adb {lab.adb('version').stdout.splitlines()[1]}; phone {lab.phones[0].serial}")
        device.shell("true")  # warm up the link and the page cache of the interpreter
        summary("line latency, phone write -> read, shell v1", line_latency_v1(device, args.lines))
        summary("line latency, phone write -> read, shell,v2,raw", line_latency_v2(device, args.lines))
        summary("round trip, 1 line via `cat`, shell,v2,raw", round_trip_v2(device, args.lines))
        summary("kill latency, host close -> process gone", kill_latency(device, 20))
        print(f"{'throughput, head -c via shell,v2,raw':<48} {stream_throughput(device, args.mb):7.1f} MB/s "
              f"({args.mb} MB)")
        push, pull = sync_throughput(device, args.mb)
        print(f"{'throughput, adbutils sync push / pull':<48} {push:7.1f} / {pull:.1f} MB/s ({args.mb} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
