#!/usr/bin/env python3
"""What only the server sees during a load test: each phone's decode rate, temperature and load over
time (docs/capacity.md). Sample a running qhx-server, then plot the samples (matplotlib, a PNG)::

    python scripts/health_plot.py sample --url http://127.0.0.1:8000 --out run.jsonl [--every 2] [--for 600]
    python scripts/health_plot.py plot run.jsonl --out run.png [--title "8 phones, 24 clients"]

``sample`` reads ``GET /v1/devices`` and ``GET /metrics`` (``qhx:num_requests_waiting``) every
``--every`` seconds until ``--for`` seconds have passed or it is stopped (Ctrl-C, SIGTERM), and writes
one JSON line per sample: ``{"t": <unix time>, "waiting": {model: n}, "phones": [{serial, state,
temperature_c, thermal_status, decode_tps, last_decode_tps, drained, busy, battery_level}]}``. A
sample the server does not answer is skipped. ``plot`` draws three panels over minutes since the
first sample: decode rate (tok/s, measured over each phone's recent requests), temperature (a phone's
samples while drained are marked), and load (requests waiting for a phone, phones busy). matplotlib is
an optional extra (``pip install -e '.[plot]'``); sampling needs only httpx.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx

WAITING = re.compile(r'^qhx:num_requests_waiting\{model_name="([^"]*)"\}\s+([0-9.eE+-]+)', re.MULTILINE)
PHONE_FIELDS = ("serial", "state", "temperature_c", "thermal_status", "decode_tps", "last_decode_tps", "drained",
                "battery_level")


def take_sample(client: httpx.Client, url: str) -> dict[str, Any]:
    """One sample of the server at ``url`` (raises httpx.HTTPError when it does not answer)."""
    devices = client.get(f"{url}/v1/devices")
    devices.raise_for_status()
    metrics = client.get(f"{url}/metrics")
    waiting = {m.group(1): float(m.group(2)) for m in WAITING.finditer(metrics.text)} if metrics.is_success else {}
    phones = [{**{k: p.get(k) for k in PHONE_FIELDS}, "busy": p.get("request_in_flight") is not None}
              for p in devices.json()["data"]]
    return {"t": time.time(), "waiting": waiting, "phones": phones}


def sample(url: str, out: Path, *, every: float = 2.0, duration: float | None = None,
           api_key: str | None = None, stop: threading.Event | None = None) -> int:
    """Sample until ``duration`` (None: until ``stop`` is set or a signal); returns the samples written."""
    stop = stop or threading.Event()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    written = 0
    with httpx.Client(timeout=max(1.0, every), headers=headers) as client, out.open("a", encoding="utf-8") as f:
        deadline = None if duration is None else time.monotonic() + duration
        first = True  # one sample at least, however short the duration
        while first or not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            first = False
            t0 = time.monotonic()
            try:
                f.write(json.dumps(take_sample(client, url.rstrip("/"))) + "\n")
                f.flush()
                written += 1
            except (httpx.HTTPError, ValueError, KeyError) as e:
                print(f"sample skipped: {e}", file=sys.stderr)
            stop.wait(max(0.0, every - (time.monotonic() - t0)))
    return written


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The samples of a file, skipping what is not one: a line cut short when the sampler was killed,
    or anything else that found its way in (a sample is an object with a time ``t`` and ``phones``)."""
    samples = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            sample = json.loads(line)
        except ValueError:
            continue
        if _is_sample(sample):
            sample.setdefault("waiting", {})
            samples.append(sample)
    return samples


def _is_sample(sample: Any) -> bool:
    return (isinstance(sample, dict) and isinstance(sample.get("t"), int | float)
            and isinstance(sample.get("phones"), list)
            and all(isinstance(p, dict) and isinstance(p.get("serial"), str) for p in sample["phones"])
            and isinstance(sample.get("waiting", {}), dict))


def series(samples: Iterable[dict[str, Any]], field: str) -> dict[str, tuple[list[float], list[float | None]]]:
    """Per phone (serial): (minutes since the first sample, values of ``field``), at every sample: None
    where the phone was not there (unplugged, not plugged in yet), so that its line breaks there."""
    samples = list(samples)
    t0 = samples[0]["t"] if samples else 0.0
    serials = sorted({p["serial"] for s in samples for p in s["phones"]})
    out: dict[str, tuple[list[float], list[float | None]]] = {serial: ([], []) for serial in serials}
    for s in samples:
        present = {p["serial"]: p for p in s["phones"]}
        for serial, (xs, ys) in out.items():
            xs.append((s["t"] - t0) / 60)
            ys.append(present[serial].get(field) if serial in present else None)
    return out


def plot(samples: list[dict[str, Any]], out: Path, *, title: str = "") -> None:
    """Three panels (decode rate, temperature, load) over time, as a PNG."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("plotting needs matplotlib: .venv/bin/pip install -e '.[plot]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        sys.exit("no samples to plot")
    fig, (rate_ax, temp_ax, load_ax) = plt.subplots(3, 1, figsize=(11, 10), sharex=True,
                                                    gridspec_kw={"height_ratios": [3, 3, 2]})
    colors = plt.get_cmap("tab10")
    rates, temps, drained = series(samples, "decode_tps"), series(samples, "temperature_c"), series(samples, "drained")
    for i, serial in enumerate(sorted(rates)):
        color, label = colors(i % 10), serial
        xs, ys = rates[serial]
        rate_ax.plot(xs, [_number(y) for y in ys], color=color, label=label, linewidth=1.4)
        xs, ys = temps[serial]
        degrees = [_number(y) for y in ys]
        temp_ax.plot(xs, degrees, color=color, label=label, linewidth=1.4)
        hot = [(x, y) for x, y, d in zip(xs, degrees, drained[serial][1], strict=True) if d and not math.isnan(y)]
        if hot:
            temp_ax.scatter([x for x, _ in hot], [y for _, y in hot], color=color, marker="x", s=14, zorder=3)
    rate_ax.set_ylabel("decode rate (tok/s)\nrecent requests")
    top = max((y for _, ys in rates.values() for y in map(_number, ys) if not math.isnan(y)), default=1.0)
    rate_ax.set_ylim(0, top * 1.15)
    temp_ax.set_ylabel("temperature (°C)\nx: drained")
    t0 = samples[0]["t"]
    minutes = [(s["t"] - t0) / 60 for s in samples]
    waiting = [sum(v for v in s["waiting"].values() if isinstance(v, int | float)) for s in samples]
    busy = [sum(1 for p in s["phones"] if p.get("busy")) for s in samples]
    load_ax.plot(minutes, waiting, color="black", label="requests waiting for a phone")
    load_ax.plot(minutes, busy, color="grey", linestyle="--", label="phones busy")
    load_ax.set_ylabel("requests")
    load_ax.set_ylim(bottom=0)
    load_ax.set_xlabel("minutes")
    load_ax.legend(loc="upper right", fontsize=8)
    rate_ax.legend(loc="lower left", fontsize=7, ncol=4)
    for ax in (rate_ax, temp_ax, load_ax):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _number(value: Any) -> float:
    """A sample's value as a float; NaN (a gap in the line) when it is unknown or not a number."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="sample /v1/devices and /metrics to a JSON-lines file")
    s.add_argument("--url", default="http://127.0.0.1:8000")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--every", type=float, default=2.0, help="seconds between samples (default 2)")
    s.add_argument("--for", dest="duration", type=float, help="stop after this many seconds (default: Ctrl-C)")
    s.add_argument("--api-key", help="when the server wants one")
    p = sub.add_parser("plot", help="plot a samples file as a PNG")
    p.add_argument("samples", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--title", default="")
    args = parser.parse_args(argv)
    if args.command == "sample":
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        n = sample(args.url, args.out, every=args.every, duration=args.duration, api_key=args.api_key, stop=stop)
        print(f"{n} samples in {args.out}")
        return 0
    plot(read_samples(args.samples), args.out, title=args.title)
    print(f"plot in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
