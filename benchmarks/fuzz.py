"""The long fuzz run: schemathesis over every operation of the API, many examples each.

    python benchmarks/fuzz.py [--examples 300] [--phones 2] [--seed N]

The suite runs the same checks with a dozen examples per operation (tests/api/test_fuzz.py, whose
schema loader and checks this script reuses so they cannot drift apart); this runs ``--examples``
per operation against ``qhx-server serve`` on simulated phones at full speed (a subprocess, as
deployed), and prints, per operation, how many calls got which status and every distinct failure
(a 5xx, a timeout, an error outside the envelope, a response unlike its schema, a broken stream).
Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from stack import Stack, machine_info

from tests.api.test_fuzz import (
    CONFIG,
    REQUEST_TIMEOUT_S,
    load_schema,
    openai_error_envelope,
    well_formed_event_stream,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=300, help="examples per operation")
    parser.add_argument("--phones", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = parser.parse_args()
    print(machine_info())
    statuses: dict[str, collections.Counter[int | str]] = collections.defaultdict(collections.Counter)
    failures: dict[str, list[str]] = collections.defaultdict(list)
    details: list[str] = []  # each distinct failure in full, with the body that caused it
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp), phones=args.phones,
                                                     serve_args=["--max-queue", "8"]) as stack:
        stack.knobs(speed=0, stop_rate=0.02)  # full speed; answers end naturally too
        schema = load_schema(CONFIG)

        def fuzz_one(label: str, strategy: Any) -> Any:
            @given(case=strategy)
            @settings(max_examples=args.examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                try:
                    response = case.call_and_validate(
                        base_url=stack.base_url, timeout=REQUEST_TIMEOUT_S,
                        additional_checks=[openai_error_envelope, well_formed_event_stream])
                    statuses[label][response.status_code] += 1
                except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - tallied and printed, the run goes on
                    statuses[label]["failed"] += 1
                    text = f"{type(exc).__name__}: {exc}".splitlines()
                    summary = " / ".join(line.strip() for line in text[:6] if line.strip())
                    if summary not in failures[label]:
                        failures[label].append(summary)
                        details.append(f"{label}: {exc}\n" + "\n".join(
                            f"  {sub}" for sub in getattr(exc, "exceptions", [])) + f"\n  case: {case.body!r:.2000}")

            return run

        t0 = time.monotonic()
        for result in schema.get_all_operations():
            operation = result.ok()
            label = f"{operation.method.upper()} {operation.path}"

            run = fuzz_one(label, operation.as_strategy())
            if args.seed is not None:
                run = seed(args.seed)(run)
            run()
            print(f"{label:45s} " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses[label].items(), key=str)),
                  flush=True)
        elapsed = time.monotonic() - t0
        alive = stack.srv is not None and stack.srv.poll() is None
    calls = sum(sum(c.values()) for c in statuses.values())
    print(f"\n{calls} calls over {len(statuses)} operations in {elapsed:.0f} s; server alive at the end: {alive}")
    for label, found in failures.items():
        for text in found:
            print(f"FAILED {label}: {text[:400]}")
    for text in details:
        print(text)
    return 1 if failures or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
