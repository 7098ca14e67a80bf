"""What a phone holds and what it can serve (device-protocol.md section 1).

``discover()`` asks the phone for its properties and bundles, derives the model identity of the bundle
to serve, checks that the bundle's Hexagon arch matches the phone's SoC, and makes sure the bundle's
tokenizer.json, and its chat template files if it ships any, are in the host cache
(``tokenizer_cache.py``; pulled only when not cached). The pure parts
(listing parsing, identity, bundle choice, arch check) are separate functions, tested without a phone.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from server.backends.adb.quoting import sh_quote
from server.backends.adb.tokenizer_cache import TOKENIZER, ensure_tokenizer
from server.backends.adb.transport import AdbServerClient, run_shell
from server.backends.base import ModelInfo
from server.settings import Settings

logger = logging.getLogger(__name__)

# Hexagon arch of each SoC (getprop ro.soc.model). Bundles are compiled for one arch and only load
# there. Extend when validating a new phone.
SOC_ARCH: dict[str, str] = {
    "SM8850": "v81",
    "SM8750": "v79",
    "SM8650": "v75",
    "SM8635": "v73",
    "SM8550": "v73",
    "SM8475": "v69",
    "SM8450": "v69",
    "SM8350": "v68",
}
DEFAULT_BUNDLE = "qwen35"
_MANIFEST = re.compile(r"^(?P<family>.+)-(?P<context>\d+)\.json$")


class Incompatible(Exception):
    """The phone cannot serve: wrong arch, no bundle, missing files. The message says why."""


@dataclass(slots=True)
class Bundle:
    """One artifacts root under the device root, e.g. ``qwen35/``."""

    name: str
    manifest: str  # file name inside the bundle, e.g. qwen3.5-0.8b-1024.json
    family: str  # qwen3.5-0.8b
    context: int  # 1024
    precision: str  # fp16 | w8
    files: list[str] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        return f"{self.family}-w8" if self.precision == "w8" else self.family

    @property
    def manifest_path(self) -> str:
        """Relative to the device root, as the launch command takes it."""
        return f"{self.name}/{self.manifest}"


@dataclass(slots=True)
class PhoneFacts:
    """What discovery found. ``problem`` set: the phone cannot serve (INCOMPATIBLE), and says why."""

    product_model: str | None
    soc: str | None
    simulated: bool
    bundles: list[Bundle] = field(default_factory=list)
    bundle: Bundle | None = None
    manifest: dict[str, Any] = field(default_factory=dict)
    model: ModelInfo | None = None
    problem: str | None = None


# --------------------------------------------------------------------------- pure parts


_PROP_LINE = re.compile(r"^\[(?P<key>[^\]]+)\]: \[(?P<value>.*)\]$")


def parse_props(text: str) -> dict[str, str]:
    """Properties from ``getprop`` (no argument) output: ``[key]: [value]`` lines."""
    props: dict[str, str] = {}
    for line in text.splitlines():
        m = _PROP_LINE.match(line.strip())
        if m:
            props[m["key"]] = m["value"]
    return props


def parse_bundles(paths: list[str]) -> list[Bundle]:
    """Bundles from ``<dir>/<file>`` paths (json and bin files one level under the device root).

    A bundle is a directory with a ``<family>-<N>.json`` manifest (tokenizer.json and other json files
    do not match); its precision is w8 when a decode binary ends in ``_w8.bin``, else fp16."""
    by_dir: dict[str, list[str]] = {}
    for path in paths:
        d, sep, name = path.strip().partition("/")
        if sep and name and "/" not in name:
            by_dir.setdefault(d, []).append(name)
    bundles = []
    for d in sorted(by_dir):
        files = sorted(by_dir[d])
        manifests = [f for f in files if _MANIFEST.match(f)]
        if not manifests:
            continue
        if len(manifests) > 1:
            logger.warning("bundle %s has several manifests %s; using %s", d, manifests, manifests[0])
        m = _MANIFEST.match(manifests[0])
        assert m is not None
        w8 = any(f.endswith("_w8.bin") for f in files)
        bundles.append(Bundle(d, manifests[0], m["family"], int(m["context"]), "w8" if w8 else "fp16", files))
    return bundles


def choose_bundle(bundles: list[Bundle], wanted: str | None) -> Bundle:
    """settings.bundle if given, else the fp16 ``qwen35`` if present, else the first (by name)."""
    if not bundles:
        raise Incompatible("no model bundle (a directory with a <family>-<N>.json manifest) on the phone")
    names = [b.name for b in bundles]
    if wanted is not None:
        for b in bundles:
            if b.name == wanted.strip("/"):
                return b
        raise Incompatible(f"bundle {wanted!r} is not on the phone (found: {', '.join(names)})")
    for b in bundles:
        if b.name == DEFAULT_BUNDLE:
            return b
    return bundles[0]


def arch_mismatch(manifest: dict[str, Any], soc: str | None) -> str | None:
    """Why the bundle cannot run on this SoC, or None when it can.

    The bundle's arch is the manifest's ``arch`` (or the arch of its ``soc_model``); the phone's arch
    comes from ``ro.soc.model`` via SOC_ARCH. A SoC missing from the table is accepted only when it
    is exactly the manifest's ``soc_model``."""
    bundle_soc = manifest.get("soc_model")
    bundle_arch = manifest.get("arch") or SOC_ARCH.get(str(bundle_soc))
    if bundle_arch is None:
        return None  # the manifest does not say; let the runtime decide
    if not soc:
        return f"the phone reports no ro.soc.model; the bundle needs Hexagon {bundle_arch}"
    phone_arch = SOC_ARCH.get(soc)
    if phone_arch is None:
        if bundle_soc and soc == bundle_soc:
            return None
        return (
            f"unknown SoC {soc} (not in the SoC->Hexagon arch table); the bundle is built for "
            f"{bundle_arch}" + (f" ({bundle_soc})" if bundle_soc else "")
        )
    if phone_arch != bundle_arch:
        return (
            f"bundle built for Hexagon {bundle_arch}"
            + (f" ({bundle_soc})" if bundle_soc else "")
            + f" cannot run on {soc} (Hexagon {phone_arch})"
        )
    return None


def model_identity(bundle: Bundle, settings: Settings) -> tuple[str, int]:
    """(served model name, context length), explicit settings first."""
    return settings.model_name or bundle.model_name, settings.max_context or bundle.context


# --------------------------------------------------------------------------- talking to the phone


async def discover(
    client: AdbServerClient, serial: str, settings: Settings, *, fetch_tokenizer: bool = True
) -> PhoneFacts:
    """Everything needed to serve from this phone (``problem`` says why not). PhoneLost on adb trouble.

    ``fetch_tokenizer=False`` (a listing, not serving) leaves the tokenizer where it is: the model's
    ``tokenizer_path`` and ``tokenizer_sha256`` are then empty."""
    root = settings.device_root.rstrip("/") or "/"
    # one process for all properties (each getprop costs a process start on the phone)
    script = (
        f"getprop; cd {sh_quote(root)} 2>/dev/null && for f in */*.json */*.bin; do "
        '[ -f "$f" ] && echo "file:$f"; done; true'
    )
    res = await run_shell(client, serial, script, timeout=settings.adb_timeout_s)
    text = res.text()
    props = parse_props(text)
    facts = PhoneFacts(
        product_model=props.get("ro.product.model") or None,
        soc=props.get("ro.soc.model") or None,
        simulated=props.get("ro.qhx.simulated") == "1",
        bundles=parse_bundles([line[5:] for line in text.splitlines() if line.startswith("file:")]),
    )
    try:
        await _inspect_bundle(client, serial, settings, root, facts, fetch_tokenizer)
    except Incompatible as e:
        facts.problem = str(e)
    return facts


async def _inspect_bundle(
    client: AdbServerClient, serial: str, settings: Settings, root: str, facts: PhoneFacts,
    fetch_tokenizer: bool = True,
) -> None:
    if not facts.bundles:
        raise Incompatible(f"no model bundle under {root} (expected <bundle>/<family>-<N>.json)")
    bundle = facts.bundle = choose_bundle(facts.bundles, settings.bundle_of(client.address, serial))
    if TOKENIZER not in bundle.files:
        raise Incompatible(f"bundle {bundle.name} has no {TOKENIZER}")
    bundle_dir = f"{root}/{bundle.name}"
    res = await run_shell(
        client, serial, f"cat {sh_quote(bundle_dir + '/' + bundle.manifest)}", timeout=settings.adb_timeout_s
    )
    try:
        manifest = json.loads(res.stdout)
    except ValueError as e:
        raise Incompatible(f"manifest {bundle.manifest_path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise Incompatible(f"manifest {bundle.manifest_path} is not a JSON object")
    facts.manifest = manifest
    why = arch_mismatch(manifest, facts.soc)
    if why:
        raise Incompatible(f"{bundle.name}: {why}")
    sha, path = "", ""
    if fetch_tokenizer:
        sha, cached = await ensure_tokenizer(client, serial, bundle_dir, settings)
        path = str(cached)
    name, context = model_identity(bundle, settings)
    facts.model = ModelInfo(
        name=name,
        precision=bundle.precision,
        max_context=context,
        tokenizer_path=path,
        tokenizer_sha256=sha,
        phones=[serial],
        simulated=facts.simulated,
    )
