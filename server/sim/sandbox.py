"""The simulated phone's filesystem: a sandbox folder standing in for the phone's `/`.

Phone paths map into the sandbox like a chroot (``/data/local/tmp/x`` -> ``<sandbox>/data/local/tmp/x``).
Shell commands run on the host, so their text is rewritten instead: the prefixes ``/data`` and
``/sdcard`` at the start of a word become ``<sandbox>/data`` and ``<sandbox>/sdcard``. Known limitation:
that rewrite also applies inside quoted strings (a one-shot prompt containing ``/data/`` is changed).

The sandbox also holds what the transport owns: ``props.json`` and the ``system/bin/getprop`` script
that prints it. ``sim.json`` (timing and fault knobs for the simulated runtime) is merged atomically by
:meth:`Sandbox.configure`; the runtime re-reads it when it changes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

from server.sim.simconfig import write_sim_config

logger = logging.getLogger(__name__)

# Qualcomm board platform codenames, as `getprop ro.board.platform` reports them on such phones.
SOC_PLATFORMS = {"SM8850": "canoe", "SM8750": "sun", "SM8650": "pineapple", "SM8550": "kalama"}

# A word-initial /data or /sdcard (not part of a longer path such as foo/data/ or /mnt/sdcard/).
_PHONE_PREFIX = re.compile(r"(?<![\w./~-])/(data|sdcard)(?=/|$|[\s'\";&|)<>`])")

# getprop reads props.json next to system/bin/; -I -S keeps the host's site and env out of it.
_GETPROP = """#!{python} -IS
import json, pathlib, sys
props = json.loads((pathlib.Path(__file__).resolve().parents[2] / "props.json").read_text())
if len(sys.argv) > 1:
    print(props.get(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
else:
    for key in sorted(props):
        print("[%s]: [%s]" % (key, props[key]))
"""

# dumpsys runs the package's module without the host's site or env (-I -S: stdlib only, quick to start)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_DUMPSYS = """#!{python} -IS
import sys
sys.path.insert(0, {root})
from server.sim.dumpsys import main
sys.exit(main())
"""


def default_props(*, soc: str = "SM8850", name: str = "qhxsim") -> dict[str, str]:
    """Props of a simulated phone with that SoC (the banner sends the ro.product.* ones)."""
    return {
        "ro.product.name": name,
        "ro.product.model": f"QHX-Sim-{soc}",
        "ro.product.device": name,
        "ro.product.manufacturer": "qhx",
        "ro.soc.manufacturer": "QTI",
        "ro.soc.model": soc,
        "ro.board.platform": SOC_PLATFORMS.get(soc, "unknown"),
        "ro.build.version.release": "16",
        "ro.build.version.sdk": "36",
        "ro.product.cpu.abi": "arm64-v8a",
        # not an Android prop: marks a simulated phone, so the server labels its tokens as simulated
        "ro.qhx.simulated": "1",
    }


class Sandbox:
    """One phone's folder: path mapping, command environment, props and the sim.json knobs."""

    def __init__(self, root: Path, *, props: dict[str, str], env: dict[str, str] | None = None) -> None:
        self.root = root.resolve()
        self.props = props  # shared with the owner: the banner is built from it on every connection
        self.extra_env = dict(env or {})
        self._config_lock = threading.Lock()

    def create(self) -> None:
        """Lay out the folders a phone has, and the transport's files (props.json, getprop)."""
        for sub in ("data/local/tmp", "sdcard", "system/bin"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.write_props()
        getprop = self.root / "system/bin/getprop"
        getprop.write_text(_GETPROP.format(python=sys.executable))
        getprop.chmod(0o755)
        dumpsys = self.root / "system/bin/dumpsys"  # thermalservice and battery (server/sim/dumpsys.py)
        dumpsys.write_text(_DUMPSYS.format(python=sys.executable, root=repr(_PACKAGE_ROOT)))
        dumpsys.chmod(0o755)

    def write_props(self) -> None:
        _write_atomic(self.root / "props.json", json.dumps(self.props, indent=1, sort_keys=True))

    def reload_props(self) -> None:
        """Take in props that staging added to props.json (in place, so every holder sees them)."""
        self.props.update(json.loads((self.root / "props.json").read_text()))

    def phone_path(self, path: str) -> Path:
        """Host path of a phone path; relative paths are taken from the phone's `/`.

        Raises ValueError for a path that would leave the sandbox (``/../..``)."""
        host = Path(os.path.normpath(self.root / path.lstrip("/")))
        if host != self.root and self.root not in host.parents:
            raise ValueError(f"phone path outside the sandbox: {path!r}")
        return host

    def rewrite_command(self, command: str) -> str:
        """Point the phone prefixes of a shell command at the sandbox (one pass, so no double rewrite)."""
        return _PHONE_PREFIX.sub(lambda m: f"{self.root}/{m.group(1)}", command)

    def env(self) -> dict[str, str]:
        """Environment of a phone command: a clean one, not the host's, plus the phone's extra env."""
        env = {
            "PATH": f"{self.root / 'system/bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.root),
            "TMPDIR": str(self.root / "data/local/tmp"),
            "QHX_SIM_SANDBOX": str(self.root),
            # phone commands run Python from the host's tree (the simulated runtime): no __pycache__
            # written next to that source, since nothing outside the sandbox is written
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        env.update(self.extra_env)
        return env

    def configure(self, **knobs: Any) -> None:
        """Merge knobs into sim.json atomically (tmp file + rename), so a reader never sees half a file.

        Unknown knob names raise KeyError (server.sim.simconfig lists them)."""
        with self._config_lock:  # read-merge-write must not interleave between threads
            current = write_sim_config(self.root, knobs, merge=True)
        logger.debug("%s: sim.json now %s", self.root.name, current)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
