"""Settings are checked when they are made: every bad value is one short, named problem.

Defect (issue 10, #7): ``--max-queue 0`` (or negative) was accepted, and then every request got 429
"queue full (0 waiting)" with idle phones. The class: any numeric setting without a bound. The tests
below derive the bad values from each field's own bounds, so a new field is covered as soon as it has
one, and ``test_every_numeric_setting_is_bounded`` fails for a new field that has none.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

import annotated_types
import pytest

from server import cli
from server.settings import Settings, SettingsInvalid, parse_host_port


def _numeric_type(annotation: Any) -> type | None:
    args = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    found = [a for a in args if a in (int, float)]
    return found[0] if found else None


NUMERIC = {name: t for name, f in Settings.model_fields.items() if (t := _numeric_type(f.annotation)) is not None}


def _bounds(name: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for m in Settings.model_fields[name].metadata:
        for key in ("ge", "gt", "le", "lt"):
            if isinstance(m, getattr(annotated_types, key.capitalize())):
                found[key] = getattr(m, key)
    return found


def _bad_values(name: str) -> list[str]:
    bounds, kind = _bounds(name), NUMERIC[name]
    step = 1 if kind is int else 0.5
    bad = ["abc"]
    if "ge" in bounds:
        bad.append(str(bounds["ge"] - step))
    if "gt" in bounds:
        bad += [str(bounds["gt"]), str(bounds["gt"] - step)]
    if "le" in bounds:
        bad.append(str(bounds["le"] + step))
    if kind is float:
        bad += ["nan", "inf"]
    return [b.removesuffix(".0") if kind is int else b for b in bad]


BAD = [(name, value) for name in NUMERIC for value in _bad_values(name)]


def test_every_numeric_setting_is_bounded() -> None:
    assert {"max_queue", "port", "sim", "stall_timeout_s", "max_context"} <= set(NUMERIC)
    unbounded = [name for name in NUMERIC if not {"ge", "gt"} & set(_bounds(name))]
    assert unbounded == [], f"numeric settings without a lower bound: {unbounded}"


@pytest.mark.parametrize(("name", "value"), BAD)
def test_a_bad_number_in_the_environment_is_one_named_problem(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(f"QHX_{name.upper()}", value)
    with pytest.raises(SettingsInvalid) as e:
        Settings()
    assert [p.field for p in e.value.problems] == [name]
    assert str(e.value).startswith(f"QHX_{name.upper()}={value}: ") and "\n" not in str(e.value)


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` must never start here: a bad value that got through fails the test at once."""

    def started(settings: Settings) -> int:
        raise AssertionError(f"serve started with {settings!r}")

    monkeypatch.setattr("server.serve.serve", started)


@pytest.mark.parametrize(("name", "value"), BAD)
def test_a_bad_number_on_the_command_line_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], no_server: None, name: str, value: str
) -> None:
    flag = "--" + name.replace("_", "-")
    assert cli.main(["serve", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qhx-server serve: error: {flag} {value}: ") and err.count("\n") == 1, err


@pytest.mark.parametrize("name", list(NUMERIC))
def test_each_bound_itself_is_accepted(name: str) -> None:
    bounds = _bounds(name)
    for key in ("ge", "le"):
        if key in bounds:
            assert getattr(Settings(**{name: bounds[key]}), name) == bounds[key]
    if "gt" in bounds:
        value = bounds["gt"] + (1 if NUMERIC[name] is int else 0.001)
        assert math.isclose(getattr(Settings(**{name: value}), name), value)


def test_max_queue_zero_is_refused_at_start_up(capsys: pytest.CaptureFixture[str], no_server: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported case, both ways in."""
    assert cli.main(["serve", "--max-queue", "0"]) == 2
    assert capsys.readouterr().err == "qhx-server serve: error: --max-queue 0: must be >= 1\n"
    monkeypatch.setenv("QHX_MAX_QUEUE", "-3")
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err == "qhx-server serve: error: QHX_MAX_QUEUE=-3: must be >= 1\n"


@pytest.mark.parametrize(
    ("env", "value", "says"),
    [
        ("QHX_LOG_LEVEL", "loud", "log level 'loud'"),
        ("QHX_DEVICE_ROOT", "data/local/tmp", "not an absolute path"),
        ("QHX_API_KEYS", '["sk-a", " "]', "an API key is empty"),
        ("QHX_API_KEYS", '["sk-a", "cl\u00e9-\u043a\u043b\u044e\u0447"]', "API key #2 has a character"),
        ("QHX_API_KEYS", '["sk-a\\t"]', "API key #1 has a character"),
        ("QHX_API_KEYS", '[" sk-a"]', "API key #1 starts or ends with a space"),
        ("QHX_ADB_SERVERS", '["nonsense"]', "'nonsense' is not host:port"),
        ("QHX_ADB_SERVERS", '["127.0.0.1:99999"]', "'127.0.0.1:99999' is not host:port"),
        ("QHX_ADB_SERVERS", "127.0.0.1:5037", "not a JSON list"),
        ("QHX_HOST", "", "at least 1 character"),
        ("QHX_MODEL_NAME", "", "at least 1 character"),
        ("QHX_METRICS_REQUIRE_KEY", "maybe", "valid boolean"),
        ("QHX_DEVICE_MODE", "fast", "'auto', 'session' or 'oneshot'"),
    ],
)
def test_other_bad_values_are_named_problems_too(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, says: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(SettingsInvalid) as e:
        Settings()
    assert str(e.value).startswith(env) and says in str(e.value) and "\n" not in str(e.value)


def test_log_level_is_case_insensitive() -> None:
    assert Settings(log_level="WARNING").log_level == "warning"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("h:1", ("h", 1)), ("tcp:10.0.0.2:65535", ("10.0.0.2", 65535)), ("[::1]:5037", ("::1", 5037)),
     ("::1:5037", ("::1", 5037)), ("5037", ("127.0.0.1", 5037))],
)
def test_host_port_forms(text: str, parsed: tuple[str, int]) -> None:
    assert parse_host_port(text) == parsed


@pytest.mark.parametrize("bad", ["nonsense", "127.0.0.1:99999", "h:0", "h:-1", "h:", ":", "", "a b:1", "::1",
                                 "h:１２", "[zz::]:1"])
def test_host_port_refuses_the_rest(bad: str) -> None:
    with pytest.raises(ValueError, match="is not host:port with a port in 1-65535"):
        parse_host_port(bad)


@pytest.mark.parametrize(
    ("server", "written"),
    [("127.0.0.1:5037", "tcp:127.0.0.1:5037"), ("127.0.0.1:5037", "5037"), ("127.0.0.1:5037", " 127.0.0.1:5037 "),
     ("[::1]:5037", "::1:5037"), ("[::1]:5037", "tcp:[::1]:5037"), ("[::1]:5037", "[::1]:5037"),
     ("phones.lan:5037", "phones.lan:5037")],
)
def test_bundle_for_names_an_adb_server_in_any_spelling_the_adb_server_setting_takes(
    server: str, written: str
) -> None:
    """`--adb-server tcp:127.0.0.1:5037 --bundle-for tcp:127.0.0.1:5037/SER=qwen35-w8` silently served
    the default bundle: the phone's adb server is known by one spelling (`127.0.0.1:5037`) and the
    entry was compared as text (issue 10)."""
    settings = Settings(adb_servers=[written], bundle_for=[f"{written}/SER=qwen35-w8"])
    assert settings.bundle_of(server, "SER") == "qwen35-w8"
    assert settings.bundle_of(server, "OTHER") is None
    assert settings.bundle_of("10.9.9.9:5037", "SER") is None


@pytest.mark.parametrize("entry", ["nonsense/SER=qwen35-w8", "127.0.0.1:99999/SER=qwen35-w8", "/SER=qwen35-w8"])
def test_bundle_for_with_an_adb_server_that_cannot_be_one_is_refused_at_start_up(entry: str) -> None:
    with pytest.raises(SettingsInvalid, match="bundle_for"):
        Settings(bundle_for=[entry])


def test_a_refused_api_key_is_not_shown() -> None:
    """The message says which key (its place) and why, never the key: it goes to terminals and logs."""
    with pytest.raises(SettingsInvalid) as e:
        Settings(api_keys=["sk-fine", "sk-secret-\u00e9t\u00e9"])
    assert "API key #2" in str(e.value) and "secret" not in str(e.value)
