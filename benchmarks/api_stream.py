"""OpenAI API streaming benchmark: what the official openai client sees of a phone's tokens.

Three processes, as in production: simulated phones (``qhx-server sim``, with a private adb server),
the server (``qhx-server serve --sim 0 --adb-server ...``, uvicorn) and this client
(``openai.OpenAI``, streaming ``/v1/completions``).

How the phone's timeline is measured: requests set our extension ``return_timings: true``; the final
chunk then carries ``timings`` with the phone's ``t_ms`` of its first and last ``tok`` event (the
phone's monotonic clock). A simulated phone runs on this machine, so its clock is this machine's
CLOCK_MONOTONIC, the clock of ``time.monotonic()`` here: client and phone times compare directly.

1. At the phone's real rate (speed 1: 22.7 tok/s, fp16 SM8850):
   * TTFT overhead = (client receives the first text chunk) - (phone emits its first ``tok``), median;
     everything the host adds: adb transport, session parsing, pool, detokenizer, SSE, HTTP, client.
   * rate ratio = client tokens/s between first and last text chunk / phone tokens/s between first
     and last ``tok`` (target >= 99.5 %).
2. At full speed (speed 0, no simulated delays): completion tokens / (request sent -> [DONE]) seen
   by the client, for one stream (target >= 2,000 tok/s).

    .venv/bin/python benchmarks/api_stream.py [--ttft-runs 20] [--rate-runs 3] [--fast-runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
from stack import Stack, machine_info, process_cpu_s

PROMPT = "Write a long story about a phone that serves a language model:"


@dataclass
class Run:
    tokens: int
    t_sent: float  # client monotonic, seconds
    t_first: float  # first chunk with text
    t_last: float  # last chunk with text
    t_done: float  # stream end ([DONE])
    timings: dict[str, Any]

    @property
    def ttft_overhead_ms(self) -> float:
        return self.t_first * 1000 - float(self.timings["phone_first_token_t_ms"])

    @property
    def client_rate(self) -> float:
        return (self.tokens - 1) / (self.t_last - self.t_first)

    @property
    def phone_rate(self) -> float:
        span = (float(self.timings["phone_last_token_t_ms"]) - float(self.timings["phone_first_token_t_ms"])) / 1000
        return (self.tokens - 1) / span


def stream_once(client: openai.OpenAI, model: str, max_tokens: int) -> Run:
    t_sent = time.monotonic()
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
        extra_body={"return_timings": True},
    )
    t_first = t_last = 0.0
    timings: dict[str, Any] = {}
    tokens = 0
    for chunk in stream:
        now = time.monotonic()
        if chunk.choices and chunk.choices[0].text:
            t_first = t_first or now
            t_last = now
        if chunk.choices and chunk.choices[0].finish_reason:
            timings = (chunk.model_extra or {}).get("timings") or {}
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return Run(tokens, t_sent, t_first, t_last, time.monotonic(), timings)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ttft-runs", type=int, default=20, help="short streams for the TTFT overhead")
    ap.add_argument("--rate-runs", type=int, default=3, help="long streams at the phone's rate")
    ap.add_argument("--rate-tokens", type=int, default=200)
    ap.add_argument("--fast-runs", type=int, default=10, help="streams at full speed")
    ap.add_argument("--fast-tokens", type=int, default=1000)
    args = ap.parse_args()

    print(f"machine: {machine_info()}")
    with tempfile.TemporaryDirectory(prefix="qhx-bench-") as tmp, Stack(Path(tmp)) as stack:
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0)
        print(f"server {stack.base_url}, model {stack.model}, phone sandbox {stack.sandbox}")

        stack.knobs(speed=1)
        short = [stream_once(client, stack.model, 8) for _ in range(args.ttft_runs)]
        overheads = sorted(r.ttft_overhead_ms for r in short)
        adb_part = sorted(float(r.timings["host_first_token_t_ms"]) - float(r.timings["phone_first_token_t_ms"])
                          for r in short)
        print(f"\n1. phone at its real rate (speed 1), {args.ttft_runs} streams of 8 tokens")
        print(f"   TTFT overhead (client first chunk - phone first tok): median {statistics.median(overheads):.2f} ms,"
              f" p90 {overheads[int(0.9 * (len(overheads) - 1))]:.2f} ms, max {overheads[-1]:.2f} ms")
        print(f"   all (ms): {[round(x, 1) for x in overheads]}")
        print(f"     of which phone -> engine (adb transport, session, pool): median "
              f"{statistics.median(adb_part):.2f} ms")

        long = [stream_once(client, stack.model, args.rate_tokens) for _ in range(args.rate_runs)]
        for r in long:
            print(f"   {r.tokens} tokens: phone {r.phone_rate:.2f} tok/s, client {r.client_rate:.2f} tok/s, "
                  f"ratio {100 * r.client_rate / r.phone_rate:.2f} %")
        ratio = min(r.client_rate / r.phone_rate for r in long)
        print(f"   worst ratio {100 * ratio:.2f} % (target >= 99.5 %)")

        stack.knobs(speed=0)
        stream_once(client, stack.model, args.fast_tokens)  # warm-up at the new speed
        assert stack.srv is not None
        srv_cpu0, me_cpu0 = process_cpu_s(stack.srv.pid), time.process_time()
        fast = [stream_once(client, stack.model, args.fast_tokens) for _ in range(args.fast_runs)]
        n_total = sum(r.tokens for r in fast)
        srv_us = (process_cpu_s(stack.srv.pid) - srv_cpu0) / n_total * 1e6
        me_us = (time.process_time() - me_cpu0) / n_total * 1e6
        rates = sorted(r.tokens / (r.t_done - r.t_sent) for r in fast)
        phone_rates = sorted(r.phone_rate for r in fast)
        lags = sorted(r.t_done * 1000 - float(r.timings["phone_last_token_t_ms"]) for r in fast)
        print(f"\n2. phone at full speed (speed 0), {args.fast_runs} streams of {args.fast_tokens} tokens")
        print(f"   client-seen tok/s (request sent -> [DONE]): median {statistics.median(rates):.0f}, "
              f"min {rates[0]:.0f}, max {rates[-1]:.0f} (target >= 2000)")
        print(f"   the phone's own rate (first -> last tok): median {statistics.median(phone_rates):.0f} tok/s; "
              f"client [DONE] after the phone's last tok: median {statistics.median(lags):.1f} ms")
        print(f"   CPU per token: server {srv_us:.0f} us (one core: ~{1e6 / srv_us:.0f} tok/s), "
              f"openai client {me_us:.0f} us")
        client.close()
    ok = statistics.median(overheads) <= 10 and ratio >= 0.995 and statistics.median(rates) >= 2000
    print(f"\n{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
