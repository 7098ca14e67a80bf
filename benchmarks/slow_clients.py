"""Clients that never read: server memory and phone time (docs/reliability.md, "Slow clients").

    python benchmarks/slow_clients.py [--clients 100] [--phones 8] [--tokens 1000] [--write-timeout-s 5]
                                      [--tps 100]

``--clients`` raw sockets (4 KiB receive buffer) each send a streamed completion of ``--tokens``
tokens (``ignore_eos``: exact lengths) to ``qhx-server serve`` on ``--phones`` simulated phones
decoding at ``--tps`` tokens/s, and never read a byte. Printed: the server's RSS before (no load,
warmed up) and its peak while the clients hang on (sampled every 0.2 s), and from the server's
access lines, per request: how long it held a phone (its total time minus its queue time), how many
tokens the phone generated before the write timeout cancelled it, and whether the server logged the
cancellation; at the end, whether every phone is idle and every connection was dropped.

Targets (issue 13): RSS under the no-load value + 100 MB; every phone free again within the write
timeout of the moment its client's buffers were full.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from stack import Stack, machine_info


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def open_unread_stream(base: str, body: dict[str, Any]) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def dropped(sock: socket.socket) -> bool:
    """Whether the server ended the connection (reset or closed), reading what it sent first."""
    sock.settimeout(2)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def log_lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]


def access_lines(log: Path) -> list[dict[str, Any]]:
    """The access lines of generations (the probes and the device list are not)."""
    return [x for x in log_lines(log) if x.get("logger") == "server.api.access"
            and x.get("path") == "/v1/completions"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--phones", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--write-timeout-s", type=float, default=5.0)
    parser.add_argument("--tps", type=float, default=100.0, help="simulated decode rate, tokens/s")
    args = parser.parse_args()
    print(machine_info())
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        serve_args = ["--max-queue", str(args.clients + 8), "--write-timeout-s", str(args.write_timeout_s),
                      "--log-format", "json", "--log-level", "info"]
        with Stack(Path(tmp) / "sim", phones=args.phones, serve_args=serve_args, serve_log=log) as stack:
            stack.knobs(stop_rate=0.0, decode_tps=args.tps, prefill_factor=0.05)
            assert stack.srv is not None
            pid = stack.srv.pid
            for _ in range(3):  # warm: every phone served once
                httpx.post(stack.base_url + "/v1/completions", timeout=60,
                           json={"model": stack.model, "prompt": "warm", "max_tokens": 8}).raise_for_status()
            time.sleep(1)
            base_rss = rss_mb(pid)
            peak = [base_rss]
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    peak.append(rss_mb(pid))
                    time.sleep(0.2)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            body = {"model": stack.model, "prompt": "Tell me everything", "max_tokens": args.tokens, "stream": True,
                    "ignore_eos": True}
            before = len(access_lines(log))
            t0 = time.monotonic()
            socks = [open_unread_stream(stack.base_url, body) for _ in range(args.clients)]
            # over when every request has its access line and every phone is idle (bounded)
            deadline = t0 + 60 + args.clients / args.phones * (args.tokens / args.tps + args.write_timeout_s) * 2
            while time.monotonic() < deadline:
                time.sleep(1)
                if (len(access_lines(log)) - before >= args.clients
                        and all(p["request_in_flight"] is None for p in stack.devices())):
                    break
            elapsed = time.monotonic() - t0
            stop.set()
            sampler.join()
            idle = all(p["state"] == "ready" and p["request_in_flight"] is None for p in stack.devices())
            end_rss = rss_mb(pid)
            resets = sum(dropped(s) for s in socks)
            for s in socks:
                s.close()
            lines = log_lines(log)
            access = access_lines(log)[before:]
    held = [(x["total_ms"] - (x.get("queue_ms") or 0)) / 1000 for x in access]
    tokens = [x.get("completion_tokens") or 0 for x in access]
    logged = sum(1 for x in lines if "took no data" in x.get("msg", ""))
    full_s = args.tokens / args.tps
    print(f"{args.clients} clients x {args.tokens} tokens (never read), {args.phones} phones at {args.tps:g} tok/s, "
          f"write_timeout_s {args.write_timeout_s:g}; run {elapsed:.0f} s")
    print(f"server RSS: no load {base_rss:.0f} MB, peak {max(peak):.0f} MB (+{max(peak) - base_rss:.0f} MB), "
          f"after {end_rss:.0f} MB")
    print(f"phone held per request: median {statistics.median(held):.1f} s, p90 {pct(held, 0.9):.1f} s, "
          f"max {max(held):.1f} s (the whole {args.tokens} tokens would take {full_s:.1f} s)")
    print(f"tokens generated before the cancel: median {statistics.median(tokens):.0f}, max {max(tokens)} "
          f"of {args.tokens}; cancellations logged: {logged}; connections dropped: {resets}/{args.clients}")
    print(f"every phone idle at the end: {idle}")
    cut = {x.get("request_id") for x in lines if "took no data" in x.get("msg", "")}
    for x in access:
        if x.get("request_id") not in cut:
            print("not cut by the write timeout:", {k: x.get(k) for k in (
                "request_id", "status", "finish_reason", "completion_tokens", "queue_ms", "total_ms")})
    ok = idle and logged == args.clients and max(peak) - base_rss < 100 and max(tokens) < args.tokens
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
