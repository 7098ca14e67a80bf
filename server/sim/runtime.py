"""The simulated ``qhx_generate``: one-shot CLI and session protocol v1.1 (device-protocol.md).

Run on the simulated phone by the staged launcher, in the device root (``/data/local/tmp/wq``)::

    python -m server.sim.runtime <manifest> libQnnHtp.so libQnnSystem.so <artifacts_root> <max_new> <prompt|->

* A wrong argument count, a non-integer ``max_new`` or a missing file is a usage error: message on
  stderr, exit 2 (nothing on stdout).
* Loading checks the arch pin (the manifest's ``soc_model`` against the phone's ``ro.soc.model``,
  read from ``$QHX_SIM_SANDBOX/props.json``; SM8850 when absent), that the HTP skel library of the
  bundle's arch (``libQnnHtpV81Skel.so``) sits beside ``libQnnHtp.so``, and that no context binary is
  shorter than a staged placeholder (:data:`MIN_CONTEXT_BINARY`: a truncated push): on any of these
  the load fails like the real runtime: exit 1, with a fatal ``error`` event (``id: null``, code
  ``runtime``) first in session mode. Loading the real tokenizer.json happens inside the simulated
  load time.
* ``<prompt>`` other than ``-``: one-shot. The raw prompt (no template) is tokenized, up to
  ``max_new`` tokens are generated (greedy; stopping at the manifest's ``eos_ids``) and written to
  stdout as raw token bytes, flushed per token (a multi-byte character may span writes), then a stats
  line goes to stderr; exit 0.
* ``-``: session protocol v1.1 (server.sim.session); ``max_new`` on the command line caps every
  request's ``max_new``; ``ready`` advertises the ``checkpoints`` knob's slots (none: a v1 runtime).

Timing and fault knobs come from ``$QHX_SIM_SANDBOX/sim.json`` (server.sim.simconfig; see
docs/simulator.md). Imports stay light (stdlib + tokenizers): a process starts per session and, in
one-shot mode, per request.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from server.sim.engine import ContextOverflow, Engine, GenRequest
from server.sim.generation import TextModel
from server.sim.lifetime import die_with_parent
from server.sim.physics import PhoneBody
from server.sim.session import Output, Session
from server.sim.simconfig import SIM_JSON, SimConfigWatcher

logger = logging.getLogger("qhx")

USAGE = (
    "usage: qhx_generate <manifest.json> <libQnnHtp.so> <libQnnSystem.so> <artifacts_root> "
    "<max_new> <prompt|->"
)
EXIT_USAGE = 2
EXIT_LOAD = 1
DEFAULT_SOC = "SM8850"
MIN_CONTEXT_BINARY = 4096  # bytes of a staged placeholder (server.sim.staging.PLACEHOLDER_SIZE)


class UsageError(Exception):
    """Bad command line or missing files (exit 2)."""


class LoadError(Exception):
    """The model cannot be loaded on this phone (exit 1)."""


@dataclass(frozen=True, slots=True)
class Bundle:
    """What the runtime needs from the command line and the manifest."""

    manifest: Path
    decode_file: str
    family: str
    precision: str
    arch: str
    soc_model: str
    max_context: int
    vocab_size: int
    eos_ids: list[int]
    tokenizer: Path
    max_new: int
    prompt: str
    lib_dir: Path = Path(".")  # where libQnnHtp.so is (the skel is looked up beside it)
    binaries: tuple[Path, ...] = ()  # the context binaries and the embedding table


def read_bundle(argv: list[str]) -> Bundle:
    """Validate the command line and read the manifest; raises :class:`UsageError`."""
    if len(argv) != 6:
        raise UsageError(f"expected 6 arguments, got {len(argv)}")
    manifest_arg, htp, system, root_arg, max_new_arg, prompt = argv
    for lib in (htp, system):
        if not Path(lib).is_file():
            raise UsageError(f"cannot open {lib}: No such file or directory")
    try:
        max_new = int(max_new_arg)
    except ValueError:
        raise UsageError(f"max_new must be an integer, not {max_new_arg!r}") from None
    if max_new < 1:
        raise UsageError("max_new must be >= 1")
    manifest, root = Path(manifest_arg), Path(root_arg)
    if not root.is_dir():
        raise UsageError(f"artifacts root {root_arg} is not a directory")
    try:
        plan = json.loads(manifest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"cannot open {manifest_arg}: No such file or directory") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"bad manifest {manifest_arg}: {exc}") from None
    try:
        files = [g["file"] for g in plan["graphs"].values()] + [plan["embedding"]["file"], plan["tokenizer"]]
        for name in files:
            if not (root / name).is_file():
                raise UsageError(f"cannot open {root_arg}/{name}: No such file or directory")
        return Bundle(
            manifest=manifest,
            decode_file=str(plan["graphs"]["decode"]["file"]),
            family=str(plan["family"]),
            precision=str(plan["precision"]),
            arch=str(plan["arch"]),
            soc_model=str(plan["soc_model"]),
            max_context=int(plan["max_context"]),
            vocab_size=int(plan["vocab_size"]),
            eos_ids=[int(i) for i in plan.get("eos_ids", [])],
            tokenizer=root / plan["tokenizer"],
            max_new=max_new,
            prompt=prompt,
            lib_dir=Path(htp).parent,
            binaries=tuple(root / name for name in files[:-1]),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"bad manifest {manifest_arg}: missing or invalid {exc}") from None


def phone_soc(sandbox: Path | None) -> str:
    """``ro.soc.model`` of the simulated phone (SM8850 when the sandbox has no props.json)."""
    if sandbox is None:
        return DEFAULT_SOC
    try:
        props = json.loads((sandbox / "props.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return DEFAULT_SOC
    return str(props.get("ro.soc.model") or DEFAULT_SOC)


def load_model(bundle: Bundle, soc: str) -> TextModel:
    """Arch check, skel, binary sizes, then the tokenizer; raises :class:`LoadError` like a failed
    context load."""
    if soc != bundle.soc_model:
        raise LoadError(
            f"QnnContext_createFromBinary failed for {bundle.decode_file}: context binary built for "
            f"{bundle.soc_model} (Hexagon {bundle.arch}), device is {soc} (error 5005: incompatible arch)"
        )
    skel = f"libQnnHtp{bundle.arch.upper()}Skel.so"
    if not (bundle.lib_dir / skel).is_file():
        raise LoadError(f"QnnDevice_create failed: unable to load {skel} on the HTP (not found beside "
                        f"libQnnHtp.so; error 1008)")
    for binary in bundle.binaries:
        size = binary.stat().st_size
        if size < MIN_CONTEXT_BINARY:
            raise LoadError(f"QnnContext_createFromBinary failed for {binary.name}: truncated context binary "
                            f"({size} bytes; error 5001)")
    return TextModel(Tokenizer.from_file(str(bundle.tokenizer)))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    t0 = time.monotonic()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="[qhx] %(message)s")
    try:
        bundle = read_bundle(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        sys.stderr.write(f"qhx_generate: error: {exc}\n{USAGE}\n")
        return EXIT_USAGE
    env_sandbox = os.environ.get("QHX_SIM_SANDBOX")  # set by the simulated adbd: the phone's world
    sandbox = Path(env_sandbox) if env_sandbox else None
    watcher = SimConfigWatcher(sandbox / SIM_JSON if sandbox else None)
    cfg = watcher.current()
    session = bundle.prompt == "-" and not cfg.no_session
    out = Output(sys.stdout.buffer)
    soc = phone_soc(sandbox)
    logger.info("QHexRT (simulated) loading %s: %s %s, arch %s, on %s",
                bundle.manifest, bundle.family, bundle.precision, bundle.arch, soc)
    try:
        model = load_model(bundle, soc)
    except LoadError as exc:
        logger.error("load failed: %s", exc)
        if session:
            out.send({"ev": "error", "id": None, "code": "runtime", "message": f"load failed: {exc}"})
        return EXIT_LOAD
    # The real time spent loading counts towards load_s, so it is not paid twice.
    remaining = cfg.scale(cfg.load_s) - (time.monotonic() - t0)
    if remaining > 0:
        time.sleep(remaining)
    load_ms = round((time.monotonic() - t0) * 1000, 1)
    logger.info("model loaded in %.0f ms (max_context %d)", load_ms, bundle.max_context)
    # Slots are process memory: their number is read once, here (the `checkpoints` knob).
    engine = Engine(model, watcher, precision=bundle.precision, max_context=bundle.max_context,
                    checkpoints=cfg.checkpoints if session else 0,
                    body=PhoneBody(sandbox, watcher) if sandbox else None)
    if session:
        ready = {"ev": "ready", "proto": 1, "model": bundle.family, "precision": bundle.precision,
                 "max_context": bundle.max_context, "vocab_size": bundle.vocab_size, "load_ms": load_ms,
                 "soc": soc, "arch": bundle.arch}
        if engine.checkpoints:  # v1.1; without slots the runtime is a plain v1 one
            ready["checkpoints"] = engine.checkpoints
        out.send(ready)
        return Session(engine, out, max_new_cap=bundle.max_new, vocab_size=bundle.vocab_size).serve(sys.stdin.buffer)
    return run_oneshot(engine, model, bundle)


def run_oneshot(engine: Engine, model: TextModel, bundle: Bundle) -> int:
    """Generate for the raw prompt, writing each token's bytes to stdout as it comes."""
    ids = model.encode_prompt(bundle.prompt)
    req = GenRequest(id=None, prompt_ids=ids, max_new=bundle.max_new, stop_ids=bundle.eos_ids)
    try:
        engine.check(req)
    except ContextOverflow as exc:
        logger.error("%s", exc)
        return EXIT_LOAD
    stdout = sys.stdout.buffer

    def emit(token: int, _t_ms: float) -> None:
        stdout.write(model.token_bytes(token))
        stdout.flush()

    result = engine.run(req, emit)
    decode_s = result.decode_ms / 1000
    tps = result.completion_tokens / decode_s if decode_s > 0 else float("inf")
    logger.info("prefill %d tok in %.1f ms, decode %d tok in %.1f ms (%.1f tok/s), stop: %s",
                result.prompt_tokens, result.prefill_ms, result.completion_tokens, result.decode_ms, tps,
                result.reason)
    return 0


if __name__ == "__main__":
    die_with_parent()  # the simulated adbd's ``sh -c``: no phone process outlives its host (lifetime.py)
    sys.exit(main())
