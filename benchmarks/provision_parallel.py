"""Provisioning several phones: one after the other (``--parallel 1``) vs all at once (issue 16).

Simulated phones behind the real adb server (``SimLab``), a bundle shaped like the model card's v81/
(random binaries, scaled down: ``--mb`` in all), pushed whole to every phone into a fresh folder per
mode (nothing is skipped), verified by sha256 on the phone as ``qhx-server provision`` does. Simulated
phones share the host's CPU and disk, so the gain here is a floor: phones on their own USB links
gain more.

    .venv/bin/python benchmarks/provision_parallel.py [--phones 4] [--mb 60]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from server.ops.provision import plan_files, provision
from server.settings import Settings
from server.sim.harness import SimLab
from server.sim.staging import MANIFEST_NAME, manifest

SHARES = {"qwen3508b_decode_f16.bin": 0.5, "qwen3508b_lmhead_f16.bin": 0.25, "qwen3508b_embed_f16.bin": 0.25}


def make_bundle(folder: Path, mb: float) -> Path:
    folder.mkdir(parents=True)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest("fp16")))
    for name, share in SHARES.items():
        (folder / name).write_bytes(os.urandom(int(mb * share * 1e6)))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phones", type=int, default=4)
    parser.add_argument("--mb", type=float, default=60.0, help="bundle size in MB")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qhx-provbench-") as tmp, SimLab(phones=ns.phones, speed=0) as lab:
        bundle = make_bundle(Path(tmp) / "v81", ns.mb)
        settings = Settings(adb_servers=[lab.adb_server], adb_timeout_s=30)
        serials = [p.serial for p in lab.phones]
        for parallel in (1, ns.phones):
            plan = plan_files(bundle, name=f"bench{parallel}")
            t0 = time.monotonic()
            reports = provision(plan, settings, serials=serials, parallel=parallel)
            took = time.monotonic() - t0
            failed = [r.error for r in reports if not r.ok]
            print(f"--parallel {parallel}: {ns.phones} phones x {plan.total_bytes / 1e6:.0f} MB in {took:.1f} s "
                  f"({ns.phones * plan.total_bytes / 1e6 / took:.0f} MB/s in all)" + (f"; FAILED {failed}" if failed else ""))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
