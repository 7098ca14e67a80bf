"""``qhx-server doctor``: one command that tells a phone owner what works and what does not.

Per phone, in order, each check skipped with a reason when an earlier one makes it pointless:

1. ``adb`` (adbcheck.py): adb state, Android version, model, SoC and its Hexagon arch;
2. ``staging`` (staging.py): runtime, QNN libs and skel/stub, bundles, sizes (sha256 against a local
   copy), leftovers, free space; picks the bundle to run;
3. ``arch`` (runs.py): the bundle's arch against the SoC;
4. ``oneshot`` (runs.py): the model card's command line, its exit code, load time and decode rate;
5. ``session`` (protocol.py): session protocol v1: ready, ping, a generation, cancel;
6. ``determinism`` (determinism.py): the same ids twice, session = one-shot, tokenizer, chat template;
7. ``health`` (health.py): thermal and battery telemetry, the sustained decode rate (not with --quick).

runner.py picks the phones and runs the checks (phones in parallel); report.py holds the results and
prints them as text or JSON (schema in docs/doctor.md); cli.py is the command line. Doctor talks to
phones with the server's own parts (discovery's tables, the Launcher's command, the Session runtime),
so what it finds is what ``serve`` would meet.
"""

from server.ops.doctor.cli import main

__all__ = ["main"]
