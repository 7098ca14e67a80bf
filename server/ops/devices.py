"""``qhx-server devices``: the phones of every configured adb server, straight from adb.

An operator command (ops/): the backend layer discovers phones, this module prints what it found.

No server needs to be running. Each adb server is asked for its devices, and each phone in adb state
``device`` is discovered exactly as the server discovers it (:func:`~server.backends.adb.discovery
.discover`, minus the tokenizer pull). Rows are :class:`~server.backends.base.PhoneHealth`, the shape
of ``GET /v1/devices``, so ``--json`` prints the same fields; what only a running server knows (the
request in flight, tokens served, decode rate, uptime) stays empty; the phone's temperature, thermal
status and battery are read once (``dumpsys``), as the server polls them. ``state`` here means:

* ``ready``: discovery passed, a server would serve this phone (``model`` says as what);
* ``incompatible``: it cannot serve (no bundle, wrong SoC ...), ``last_error`` says why;
* ``offline``: adb lists it but not as ``device`` (offline, unauthorized ...), or it did not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
from typing import TextIO

from adbutils.errors import AdbError

from server.backends.adb.discovery import discover
from server.backends.adb.dumpsys import ThermalStatus
from server.backends.adb.telemetry import fill_reading, read_health
from server.backends.adb.transport import AdbServerClient, format_server, list_devices, resolve_adb_servers
from server.backends.base import PhoneHealth, PhoneState
from server.errors import QhxError
from server.settings import Settings

COLUMNS = ("ADB SERVER", "SERIAL", "PHONE", "SOC", "BUNDLES", "MODEL", "STATE", "THERMAL", "BATTERY", "NOTE")


async def _phone(client: AdbServerClient, serial: str, adb_state: str, settings: Settings) -> PhoneHealth:
    row = PhoneHealth(serial=serial, adb_server=client.address, state=PhoneState.OFFLINE)
    if adb_state != "device":
        hint = " (accept the debugging prompt on the phone)" if adb_state == "unauthorized" else ""
        row.last_error = f"adb reports {adb_state}{hint}"
        return row
    try:
        facts = await discover(client, serial, settings, fetch_tokenizer=False)
    except (QhxError, AdbError, OSError, TimeoutError) as e:
        row.last_error = f"no answer: {e}"
        return row
    row.product_model, row.soc, row.simulated = facts.product_model, facts.soc, facts.simulated
    with contextlib.suppress(QhxError, AdbError, OSError, TimeoutError):  # health is a bonus: "-" without it
        fill_reading(row, await read_health(client, serial, settings.adb_timeout_s))
    row.bundles = [b.name for b in facts.bundles]
    row.bundle = facts.bundle.name if facts.bundle else None
    if facts.problem is not None:
        row.state, row.last_error = PhoneState.INCOMPATIBLE, facts.problem
    else:
        row.state, row.model = PhoneState.READY, facts.model.name if facts.model else None
    return row


async def collect(settings: Settings) -> tuple[list[PhoneHealth], list[str]]:
    """(one row per phone of every adb server, the adb servers that did not answer and why)."""
    rows: list[PhoneHealth] = []
    unreachable: list[str] = []
    for host, port in resolve_adb_servers(settings):
        client = AdbServerClient(format_server(host, port), timeout=settings.adb_timeout_s)
        try:
            async with asyncio.timeout(settings.adb_timeout_s + 1):
                devices = await list_devices(client)
        except (AdbError, OSError, TimeoutError) as e:
            unreachable.append(f"{client.address}: {e or type(e).__name__}")
            continue
        found = await asyncio.gather(*(_phone(client, s, st, settings) for s, st in sorted(devices.items())))
        rows.extend(found)
    return rows, unreachable


def render_table(rows: list[PhoneHealth]) -> str:
    """Aligned columns; the served bundle is starred when a phone holds several."""
    lines = [list(COLUMNS)]
    for r in rows:
        bundles = ",".join(f"{b}*" if b == r.bundle and len(r.bundles) > 1 else b for b in r.bundles)
        model = (r.model or "-") + (" (simulated)" if r.simulated and r.model else "")
        lines.append([r.adb_server, r.serial, r.product_model or "-", r.soc or "-", bundles or "-", model,
                      r.state.value, thermal_cell(r), battery_cell(r), r.last_error or ""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS) - 1)]
    return "".join(
        ("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + "  " + line[-1]).rstrip() + "\n"
        for line in lines
    )


def thermal_cell(row: PhoneHealth) -> str:
    """``44.1°C SEVERE``: the temperature and Android's thermal status, what is known of them."""
    parts = [] if row.temperature_c is None else [f"{row.temperature_c:.1f}°C"]
    if row.thermal_status is not None and 0 <= row.thermal_status <= ThermalStatus.SHUTDOWN:
        parts.append(ThermalStatus(row.thermal_status).name)
    return " ".join(parts) or "-"


def battery_cell(row: PhoneHealth) -> str:
    """``84% charging``."""
    if row.battery_level is None:
        return "-"
    charging = {True: " charging", False: " on battery", None: ""}[row.charging]
    return f"{row.battery_level:.0f}%{charging}"


def print_devices(settings: Settings, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print every phone (a table, or the /v1/devices JSON); 1 when no adb server answered."""
    out = out or sys.stdout
    rows, unreachable = asyncio.run(collect(settings))
    for problem in unreachable:
        sys.stderr.write(f"adb server unreachable: {problem}\n")
    if as_json:
        data = [{**dataclasses.asdict(r), "state": r.state.value} for r in rows]
        out.write(json.dumps({"object": "list", "data": data}, indent=2) + "\n")
    elif rows:
        out.write(render_table(rows))
    else:
        sys.stderr.write("no phones\n")
    reached = len(resolve_adb_servers(settings)) - len(unreachable)
    return 0 if reached > 0 else 1
