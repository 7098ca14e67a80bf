"""Stage a simulated phone's sandbox with the device-protocol.md section 1 layout.

``<sandbox>/data/local/tmp/wq/`` receives what a hand-staged phone holds: the ``qhx_generate``
launcher (a /bin/sh script running ``python -m server.sim.runtime``), placeholder QNN libraries, and
one artifacts root per bundle (``qwen35/`` fp16, ``qwen35-w8/`` W8A16) with a manifest, placeholder
context binaries (right names, a few KB) and the real Qwen3.5 tokenizer.json (hard-linked from the
vocab cache). ``<sandbox>/sim.json`` gets the simulator knobs and ``<sandbox>/props.json`` the phone's
system properties (``ro.soc.model`` drives the runtime's arch check).

The manifest is our stand-in for the QHexRT run plan; the host treats it as opaque JSON and only
derives identity from its file name. Fields the simulated runtime reads: ``family``, ``precision``,
``max_context``, ``vocab_size``, ``arch``, ``soc_model``, ``graphs.*.file``, ``tokenizer``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import server
from server.sim.sandbox import default_props
from server.sim.simconfig import write_sim_config
from server.sim.vocab import ensure_tokenizer_json

DEVICE_ROOT = "data/local/tmp/wq"  # relative to the sandbox, i.e. /data/local/tmp/wq on the phone
FAMILY = "qwen3.5-0.8b"
MAX_CONTEXT = 1024
MANIFEST_NAME = f"{FAMILY}-{MAX_CONTEXT}.json"
MODEL_VOCAB_SIZE = 248320  # lm-head rows (config.json vocab_size, padded); tokenizer has 248,077
BUNDLES = {"fp16": ("qwen35", "f16"), "w8": ("qwen35-w8", "w8")}  # precision -> (dir, decode suffix)
QNN_LIBS = ("libQnnHtp.so", "libQnnSystem.so", "libQnnHtpV81Skel.so", "libQnnHtpV81Stub.so")
PLACEHOLDER_SIZE = 4096


def stage_phone(
    sandbox: Path,
    *,
    precision: str = "fp16",
    soc: str = "SM8850",
    props: Mapping[str, str] | None = None,
    sim_config: Mapping[str, Any] | None = None,
    vocab_cache: Path | None = None,
) -> None:
    """Write the phone layout into ``sandbox`` (idempotent: re-staging rewrites the same files).

    ``precision``: ``fp16``, ``w8`` or ``both`` bundles. ``soc``: the phone's ``ro.soc.model``
    (the bundles are v81 / SM8850; any other SoC makes the runtime fail to load, as on a real
    phone). ``props`` are extra or overriding system properties; keys already in an existing
    props.json are kept unless ``soc``/``props`` set them. ``sim_config``: knobs merged over the
    defaults (see server.sim.simconfig). ``vocab_cache``: where the tokenizer.json is cached.
    """
    if precision not in ("fp16", "w8", "both"):
        raise ValueError(f"precision must be fp16, w8 or both, not {precision!r}")
    sandbox = Path(sandbox)
    root = sandbox / DEVICE_ROOT
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "qhx_generate", launcher_script().encode(), mode=0o755)
    for lib in QNN_LIBS:
        _write(root / lib, _placeholder(lib, "QNN runtime library from the QAIRT SDK"), mode=0o755)
    tokenizer = ensure_tokenizer_json(vocab_cache)
    for p in ("fp16", "w8") if precision == "both" else (precision,):
        _stage_bundle(root, p, tokenizer)
    write_sim_config(sandbox, dict(sim_config or {}), merge=False)
    _write_props(sandbox, soc, props or {})


def launcher_script() -> str:
    """The phone's ``qhx_generate``: runs the simulated runtime with this interpreter and tree."""
    # The phone's shell runs in the sandbox, so the interpreter and the package location are baked
    # in as absolute paths at staging time (the venv's python finds its own site-packages).
    package_root = str(Path(server.__file__).resolve().parent.parent)
    return (
        "#!/bin/sh\n"
        "# qhx-server simulated phone: stands in for the QHexRT qhx_generate CLI.\n"
        f"PYTHONPATH={shlex.quote(package_root)}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        "export PYTHONPATH\n"
        f'exec {shlex.quote(sys.executable)} -m server.sim.runtime "$@"\n'
    )


def manifest(precision: str) -> dict[str, Any]:
    """The bundle manifest (a plausible QHexRT run plan) for ``fp16`` or ``w8``."""
    _, suffix = BUNDLES[precision]
    return {
        "format": "qhexrt-manifest/1",
        "model": "Qwen/Qwen3.5-0.8B",
        "family": FAMILY,
        "precision": precision,
        "arch": "v81",
        "soc_model": "SM8850",
        "qairt": "2.47",
        "host_op": "qwen3_5_generate",
        "max_context": MAX_CONTEXT,
        "vocab_size": MODEL_VOCAB_SIZE,
        "hidden_size": 1024,
        "layers": {"count": 24, "pattern": ["linear", "linear", "linear", "full"]},
        "graphs": {
            "decode": {"file": f"qwen3508b_decode_{suffix}.bin", "weights": "w8a16" if suffix == "w8" else "fp16"},
            "lm_head": {"file": "qwen3508b_lmhead_f16.bin", "tied_embedding": True},
        },
        "embedding": {"file": "qwen3508b_embed_f16.bin", "dtype": "fp16", "lookup": "host"},
        "state": {"conv_kernel": 4, "ssm_heads": 16, "kv_heads": 2, "head_dim": 256, "carried": "host"},
        "tokenizer": "tokenizer.json",
        "eos_ids": [248044, 248046],
    }


def _stage_bundle(root: Path, precision: str, tokenizer: Path) -> None:
    dirname, _ = BUNDLES[precision]
    bundle = root / dirname
    bundle.mkdir(exist_ok=True)
    plan = manifest(precision)
    _write(bundle / MANIFEST_NAME, (json.dumps(plan, indent=2) + "\n").encode())
    files = [g["file"] for g in plan["graphs"].values()] + [plan["embedding"]["file"]]
    for name in files:
        _write(bundle / name, _placeholder(name, f"QHexRT context binary ({precision})"))
    _link_or_copy(tokenizer, bundle / "tokenizer.json")


def _placeholder(name: str, what: str) -> bytes:
    header = f"QHX-SIM PLACEHOLDER {name}: stands in for the {what}; not a real binary.\n".encode()
    return header + b"\0" * (PLACEHOLDER_SIZE - len(header))


def _write_props(sandbox: Path, soc: str, props: Mapping[str, str]) -> None:
    path = sandbox / "props.json"
    existing: dict[str, str] = {}
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            existing = json.loads(path.read_text(encoding="utf-8"))
    defaults = default_props(soc=soc)
    merged = {**defaults, **existing, "ro.soc.model": soc, **props}
    _write(path, (json.dumps(merged, indent=2, sort_keys=True) + "\n").encode())


def _write(path: Path, payload: bytes, mode: int = 0o644) -> None:
    """Atomic write, so that a runtime or adbd reading concurrently never sees half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _link_or_copy(src: Path, dest: Path) -> None:
    if dest.exists() and os.path.samefile(src, dest):
        return
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # another filesystem (or no hard links): a copy is as good, just bigger
        _write(tmp, src.read_bytes())
    os.replace(tmp, dest)
