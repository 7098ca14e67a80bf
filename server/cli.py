"""`qhx-server`: serve | sim | devices | provision.

The `serve` flags are generated from the fields of :class:`server.settings.Settings`, so a flag, its
`QHX_` environment variable and its documentation can never disagree.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from typing import Any

from server.settings import Settings

logger = logging.getLogger("server.cli")

# flags whose name differs from the field (repeatable lists read better in the singular)
_FLAG_NAMES = {"adb_servers": "--adb-server", "api_keys": "--api-key", "cors_origins": "--cors-origin"}


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags fall back to QHX_ env vars, then defaults."""
    for name, field in Settings.model_fields.items():
        default = field.default if field.default_factory is None else "[]"
        help_text = f"{field.description} (env QHX_{name.upper()}; default: {default})"
        annotation = field.annotation
        origin = typing.get_origin(annotation)
        if origin is list:
            parser.add_argument(_flag(name), dest=name, action="append", help=help_text)
        elif annotation is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            choices = typing.get_args(annotation) if origin is typing.Literal else None
            parser.add_argument(_flag(name), dest=name, choices=choices, default=None, help=help_text)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    given: dict[str, Any] = {k: v for k, v in vars(ns).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def _serve(ns: argparse.Namespace) -> int:
    from server.serve import serve

    return serve(settings_from_args(ns))


def _sim(argv: list[str]) -> int:
    from server.sim.cli import main as sim_main

    return sim_main(argv)


def _provision(argv: list[str]) -> int:
    from server.ops.provision import main as provision_main

    return provision_main(argv)


def _devices(ns: argparse.Namespace) -> int:
    from server.backends.adb.report import print_devices

    return print_devices(settings_from_args(ns), as_json=ns.json)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sim":  # the simulator owns its own flags
        return _sim(argv[1:])
    if argv and argv[0] == "provision":  # so does provisioning
        return _provision(argv[1:])
    parser = argparse.ArgumentParser(prog="qhx-server", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="Run the OpenAI-compatible HTTP server.")
    add_settings_arguments(serve_p)
    serve_p.set_defaults(func=_serve)
    sub.add_parser("sim", help="Run simulated phones (see `qhx-server sim --help`).")
    dev_p = sub.add_parser("devices", help="List phones, their bundles and state, straight from adb.")
    add_settings_arguments(dev_p)
    dev_p.add_argument("--json", action="store_true", help="Print the phones as GET /v1/devices does.")
    dev_p.set_defaults(func=_devices)
    sub.add_parser("provision", help="Push a bundle (and runtime) to phones, resumable and verified "
                   "(see `qhx-server provision --help`).")
    ns = parser.parse_args(argv)
    return int(ns.func(ns))


if __name__ == "__main__":
    raise SystemExit(main())
