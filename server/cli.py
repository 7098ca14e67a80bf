"""`qhx-server`: serve | sim | devices | provision | doctor.

The `serve` flags are generated from the fields of :class:`server.settings.Settings`, so a flag, its
`QHX_` environment variable and its documentation can never disagree. Bad arguments (a flag, a `QHX_`
variable, an adb address) are one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Sequence
from typing import Any, NoReturn

from server.settings import Settings, SettingsInvalid, SettingsProblem, parse_host_port

logger = logging.getLogger("server.cli")

# flags whose name differs from the field (repeatable lists read better in the singular)
_FLAG_NAMES = {"adb_servers": "--adb-server", "api_keys": "--api-key", "cors_origins": "--cors-origin"}


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (the usage of `serve` alone is dozens), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def describe_problem(problem: SettingsProblem, argv: Sequence[str]) -> str:
    """A problem named as the user wrote it: ``--flag VALUE`` when the flag is in ``argv``, else the
    environment variable."""
    flag = _flag(problem.field)
    given = problem.env is None and any(a == flag or a.startswith(flag + "=") for a in argv)
    return problem.describe(flag if given else None)


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


def _checked_settings(ns: argparse.Namespace) -> Settings:
    """Settings from flags and env, with the adb servers resolved once now (ADB_SERVER_SOCKET and
    ANDROID_ADB_SERVER_PORT are read there) so that a bad address fails before anything starts."""
    from server.backends.adb.transport import resolve_adb_servers

    settings = settings_from_args(ns)
    resolve_adb_servers(settings)
    return settings


def _serve(ns: argparse.Namespace) -> int:
    from server.serve import serve

    return serve(_checked_settings(ns))


def _sim(argv: list[str]) -> int:
    from server.sim.cli import main as sim_main

    return sim_main(argv)


def _provision(argv: list[str]) -> int:
    from server.ops.provision import main as provision_main

    return provision_main(argv)


def _doctor(argv: list[str]) -> int:
    from server.ops.doctor import main as doctor_main

    return doctor_main(argv)


def _devices(ns: argparse.Namespace) -> int:
    from server.ops.devices import print_devices

    return print_devices(_checked_settings(ns), as_json=ns.json)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except SettingsInvalid as e:  # from Settings(...) or resolve_adb_servers, in any subcommand
        command = f"qhx-server {argv[0]}" if argv else "qhx-server"
        problems = "; ".join(describe_problem(p, argv) for p in e.problems)
        print(f"{command}: error: {problems}", file=sys.stderr)
        return 2


def _check_adb_port_variable() -> None:
    """adbutils reads ANDROID_ADB_SERVER_PORT when it is imported (and dies on a non-number), before
    any setting is used: check it first, with the parser every adb address goes through."""
    port = os.environ.get("ANDROID_ADB_SERVER_PORT", "").strip()
    if port:
        try:
            parse_host_port(f"127.0.0.1:{port}")
        except ValueError as e:
            raise SettingsInvalid(
                [SettingsProblem("adb_servers", port, str(e), env="ANDROID_ADB_SERVER_PORT")]
            ) from e


def _run(argv: list[str]) -> int:
    _check_adb_port_variable()
    if argv and argv[0] == "sim":  # the simulator owns its own flags
        return _sim(argv[1:])
    if argv and argv[0] == "provision":  # so does provisioning
        return _provision(argv[1:])
    if argv and argv[0] == "doctor":  # and the doctor
        return _doctor(argv[1:])
    parser = ArgumentParser(prog="qhx-server", description=__doc__.splitlines()[0])
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
    sub.add_parser("doctor", help="Check phones for serving: what works, what does not, what to do next "
                   "(see `qhx-server doctor --help`).")
    ns, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand, whose --help lists its flags
        said_by = {"serve": serve_p, "devices": dev_p}.get(ns.command, parser)
        said_by.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not hasattr(ns, "func"):  # `sim`, `provision` or `doctor` not written first
        parser.error(f"write {ns.command} first: qhx-server {ns.command} ...")
    return int(ns.func(ns))


if __name__ == "__main__":
    raise SystemExit(main())
