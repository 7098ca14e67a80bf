"""`qhx-server`: bad arguments are one line on stderr and exit status 2, in every subcommand.

Defect (issue 10, #10): a malformed ``--adb-server`` (``nonsense``, ``127.0.0.1:99999``) printed a
Python traceback from ``devices``, ``provision`` and ``serve``. The class: any bad argument, flag or
environment variable, of any subcommand. Each case runs the real command in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server import cli
from server.settings import SettingsProblem

ROOT = Path(__file__).resolve().parents[1]

# (args, extra environment, what the line must name)
ADB = [
    (["--adb-server", "nonsense"], {}, "--adb-server: adb server 'nonsense' is not host:port"),
    (["--adb-server", "127.0.0.1:99999"], {}, "'127.0.0.1:99999' is not host:port with a port in 1-65535"),
    (["--adb-server", "127.0.0.1:5037", "--adb-server", "h:0"], {}, "'h:0' is not host:port"),
    ([], {"QHX_ADB_SERVERS": '["127.0.0.1:99999"]'}, "QHX_ADB_SERVERS: adb server '127.0.0.1:99999'"),
    ([], {"QHX_ADB_SERVERS": "nonsense"}, "QHX_ADB_SERVERS: not a JSON list"),
    ([], {"ANDROID_ADB_SERVER_PORT": "x"}, "ANDROID_ADB_SERVER_PORT=x:"),
    ([], {"ANDROID_ADB_SERVER_PORT": "99999"}, "ANDROID_ADB_SERVER_PORT=99999:"),
    (["--adb-timeout-s", "0"], {}, "--adb-timeout-s 0"),
]
ADB_SOCKET = [
    ([], {"ADB_SERVER_SOCKET": "tcp:nonsense"}, "ADB_SERVER_SOCKET=tcp:nonsense:"),
    ([], {"ADB_SERVER_SOCKET": "localfilesystem:/tmp/adb"}, "only tcp:host:port is supported"),
]
SETTINGS = [
    (["--max-queue", "0"], {}, "--max-queue 0: must be >= 1"),
    (["--port", "99999"], {}, "--port 99999: must be <= 65535"),
    (["--log-level", "loud"], {}, "log level 'loud'"),
    (["--log-format", "xml"], {}, "--log-format: invalid choice"),
    (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    ([], {"QHX_MAX_QUEUE": "-1"}, "QHX_MAX_QUEUE=-1: must be >= 1"),
    ([], {"QHX_STALL_TIMEOUT_S": "nan"}, "QHX_STALL_TIMEOUT_S=nan: "),
]
SIM = [
    (["--listen", "127.0.0.1:99999"], {}, "port in 1-65535"),
    (["--listen", "nonsense"], {}, "expected HOST:PORT"),
    (["--listen", "127.0.0.1:65535", "--phones", "2"], {}, "go past 65535"),
    (["--phones", "0"], {}, "--phones must be at least 1"),
    (["--speed", "-1"], {}, "--speed: expected a number >= 0"),
    (["--speed", "nan"], {}, "--speed: expected a number >= 0"),
    (["--log-level", "loud"], {}, "--log-level: invalid choice"),
    ([], {"ANDROID_ADB_SERVER_PORT": "x"}, "ANDROID_ADB_SERVER_PORT=x:"),
]
PROVISION_OK = ["--bundle", str(ROOT)]  # the arguments fail before the bundle is looked at

CASES = (
    [("devices", a, e, says) for a, e, says in ADB + ADB_SOCKET]
    + [("provision", PROVISION_OK + a, e, says) for a, e, says in ADB]
    + [("provision", [], {}, "the following arguments are required: --bundle")]
    + [("serve", ["--sim", "0", *a], e, says) for a, e, says in ADB + ADB_SOCKET + SETTINGS]
    + [("sim", a, e, says) for a, e, says in SIM]
)


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("QHX_") and k not in ("ADB_SERVER_SOCKET", "ANDROID_ADB_SERVER_PORT")}
    return env | extra


@pytest.mark.parametrize(("command", "args", "env", "says"), CASES,
                         ids=[f"{c[0]} {' '.join(c[1])} {c[2]}".strip() for c in CASES])
def test_bad_arguments_are_one_line_and_exit_2(command: str, args: list[str], env: dict[str, str],
                                               says: str) -> None:
    done = subprocess.run([sys.executable, "-m", "server.cli", command, *args], check=False, cwd=ROOT,
                          env=_clean_env(env), capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"qhx-server {command}"), done.stderr
    assert says in done.stderr, done.stderr


def test_a_problem_is_named_as_the_user_wrote_it() -> None:
    problem = SettingsProblem("max_queue", "0", "must be >= 1")
    assert cli.describe_problem(problem, ["serve", "--max-queue", "0"]) == "--max-queue 0: must be >= 1"
    assert cli.describe_problem(problem, ["serve", "--max-queue=0"]) == "--max-queue 0: must be >= 1"
    assert cli.describe_problem(problem, ["serve"]) == "QHX_MAX_QUEUE=0: must be >= 1"
    listed = SettingsProblem("adb_servers", None, "adb server 'x' is not host:port")
    assert cli.describe_problem(listed, ["devices", "--adb-server", "x"]).startswith("--adb-server: ")
