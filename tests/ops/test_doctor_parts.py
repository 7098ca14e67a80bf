"""The parts of `qhx-server doctor` that need no phone: parsing the staging listing, the commands it
tells users to run, the report's JSON against the schema of docs/doctor.md for any findings, and
the parallel runner's bound."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import socket
import threading
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.ops.doctor.cli import main
from server.ops.doctor.context import Findings, _load, adb_base
from server.ops.doctor.report import CHECK_NAMES, CheckResult, DoctorReport, PhoneReport, ServerReport, Status
from server.ops.doctor.runner import bounded
from server.ops.doctor.staging import manifest_files, parse_busy, parse_listing
from server.sim.staging import manifest
from server.sim.vocab import ensure_tokenizer_json
from tests.ops.test_doctor import schema


def test_listing_gives_sizes_x_bits_and_free_space() -> None:
    text = ("qhx:file:x:1234:qhx_generate\nqhx:file:-:4096:qwen35/a b.bin\nqhx:file:-:-1:qwen35/odd:name.json\n"
            "qhx:df:/dev/block/dm-48 115712000 9000000 106712000 8% /data\n")
    exists, files, free = parse_listing(text)
    assert exists and free == 106712000 * 1024
    assert files == {"qhx_generate": (1234, True), "qwen35/a b.bin": (4096, False), "qwen35/odd:name.json": (-1, False)}
    assert parse_listing("qhx:noroot\n") == (False, {}, None)


@given(st.text())
def test_listing_parser_never_raises(text: str) -> None:
    parse_listing(text)
    assert all(pid >= 0 for pid, _ in parse_busy(text))


def test_runtimes_already_running_are_read_with_their_command_line() -> None:
    text = "qhx:df:x 1 2 3 4% /data\nqhx:busy:4242:sh -c cd /data/local/tmp/wq && ./qhx_generate a b 1024 -\n" \
           "qhx:busy:x:not a pid\n"
    assert parse_busy(text) == [(4242, "sh -c cd /data/local/tmp/wq && ./qhx_generate a b 1024 -")]


def test_manifest_names_its_binaries_and_tokenizer() -> None:
    assert manifest_files(manifest("w8")) == ["qwen3508b_decode_w8.bin", "qwen3508b_lmhead_f16.bin",
                                              "qwen3508b_embed_f16.bin", "tokenizer.json"]
    assert manifest_files({"graphs": ["../etc/x.bin"]}) == ["tokenizer.json"]  # no paths out of the bundle


@pytest.mark.parametrize(("server", "adb"), [
    ("127.0.0.1:5037", "adb"), ("127.0.0.1:41234", "adb -P 41234"), ("bench2:5037", "adb -H bench2"),
    ("10.1.2.3:6000", "adb -H 10.1.2.3 -P 6000"),
])
def test_adb_commands_name_the_adb_server(server: str, adb: str) -> None:
    assert adb_base(server) == adb


problems = st.lists(st.tuples(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1)), max_size=3)
values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text())


@settings(max_examples=60, deadline=None)
@given(fails=problems, warns=problems, notes=st.lists(st.text(min_size=1), min_size=1, max_size=3),
       data=st.dictionaries(st.text(), values, max_size=4))
def test_any_findings_give_a_report_that_validates_and_says_what_to_run(
        fails: list[tuple[str, str, str]], warns: list[tuple[str, str, str]], notes: list[str],
        data: dict[str, Any]) -> None:
    found = Findings(notes=notes)
    for what, advice, command in fails:
        found.fail(what, advice=advice, command=command)
    for what, advice, command in warns:
        found.warn(what, advice=advice, command=command)
    result = found.result(data)
    assert result.status is (Status.FAIL if fails else Status.WARN if warns else Status.PASS)
    if fails or warns:
        assert result.command == (fails or warns)[0][2]
    checks = [CheckResult(name, Status.SKIP, "not run: x") for name in CHECK_NAMES]
    checks[1] = result
    result.name = "staging"
    phone = PhoneReport("s", "127.0.0.1:5037", "device", checks=checks)
    report = DoctorReport({"qhx_server": "0", "python": "3.11.0", "adbutils": "2", "adb": {"127.0.0.1:5037": 41}},
                          {"serials": [], "all": False, "bundle": None, "local_bundle": None, "quick": True,
                           "health_seconds": 20.0, "parallel": 4}, phones=[phone], created="2026-12-01T00:00:00+00:00")
    document = json.loads(json.dumps(report.to_json(), allow_nan=False))  # no inf/nan reaches the JSON
    jsonschema.Draft202012Validator(schema()).validate(document)
    assert report.exit_code == (1 if fails else 0)
    assert all(not (isinstance(v, float) and not math.isfinite(v)) for v in result.data.values())
    text = report.render()
    if fails or warns:
        assert f"next: {result.command}" in text


def test_schema_refuses_a_failure_without_a_command() -> None:
    check = CheckResult("adb", Status.FAIL, "broken", advice="fix it", command=None).to_json()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema()["$defs"]["check"]).validate(check)


async def test_phones_run_in_parallel_up_to_the_bound() -> None:
    running, peak = 0, 0
    both = asyncio.Barrier(2)

    def job(wait: bool, patience: float = 10.0) -> Any:
        async def run() -> int:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if wait:  # only completes when two jobs run at once
                async with asyncio.timeout(patience):
                    await both.wait()
            await asyncio.sleep(0)
            running -= 1
            return peak

        return run

    assert await bounded([job(True), job(True), job(False)], 2) == [2, 2, 2]
    assert peak == 2
    running, peak = 0, 0
    assert await bounded([job(False)] * 3, 1) == [1, 1, 1]
    with pytest.raises(TimeoutError):  # one at a time, the two waiting jobs never meet
        await bounded([job(True, 0.5), job(True, 0.5)], 1)


def dead_adb_server() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("value", ["inf", "1e400", "-inf", "nan", "0"])
def test_a_non_finite_length_is_a_bad_argument_not_infinity_in_the_json(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # `--health-seconds inf --json` printed "health_seconds": Infinity, which jq and every strict parser refuse
    with pytest.raises(SystemExit) as exc:
        main(["--adb-server", dead_adb_server(), "--adb-timeout-s", "1", "--health-seconds", value, "--json"])
    assert exc.value.code == 2
    assert capsys.readouterr().out == ""


nested = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(data=st.dictionaries(st.text(max_size=8), nested, max_size=4), health=st.floats(min_value=0.001, allow_infinity=False))
def test_no_infinity_or_nan_reaches_the_json_at_any_depth(data: dict[str, Any], health: float) -> None:
    """The class: a measured rate, a telemetry reading, an option: nested anywhere, a float that is not
    finite is null in the document (a strict JSON parser reads it, the schema validates it)."""
    checks = [CheckResult(name, Status.PASS, "measured", data=data) for name in CHECK_NAMES]
    phone = PhoneReport("s", "127.0.0.1:5037", "device", checks=checks)
    report = DoctorReport({"qhx_server": "0", "python": "3.11.0", "adbutils": "2", "adb": {"127.0.0.1:5037": 41}},
                          {"serials": [], "all": False, "bundle": None, "local_bundle": None, "quick": True,
                           "health_seconds": health, "parallel": 4}, phones=[phone],
                          created="2026-12-01T00:00:00+00:00")
    text = json.dumps(report.to_json(), allow_nan=False)  # raises on inf/nan anywhere
    jsonschema.Draft202012Validator(schema()).validate(json.loads(text))


class NotAdb:
    """A TCP listener that is not an adb server: ``reply`` answers every command (None: silence, as a
    phone's own adbd port is to an adb client)."""

    def __init__(self, reply: Callable[[str], bytes] | None) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.reply = reply
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                with conn:
                    size = int(conn.recv(4), 16)
                    command = conn.recv(size).decode()
                    if self.reply is None:
                        conn.recv(1)  # until the client gives up
                    else:
                        conn.sendall(self.reply(command))


@pytest.mark.parametrize("reply", [None, lambda c: b"OKAY0004zzzz" if "version" in c else b"OKAY0000"],
                         ids=["silent", "garbage-version"])
def test_an_address_that_is_not_an_adb_server_is_named_as_such_in_valid_json(
        reply: Callable[[str], bytes] | None) -> None:
    # silent: "adb -P <port> start-server" (the port is taken: it cannot start there); garbage: a traceback
    fake = NotAdb(reply)
    try:
        out = io.StringIO()
        code = main(["--adb-server", fake.address, "--adb-timeout-s", "1", "--json"], out=out, err=io.StringIO())
        data = json.loads(out.getvalue())
        jsonschema.Draft202012Validator(schema()).validate(data)
        [server] = data["adb_servers"]
        assert code == 1 and server["reachable"] is False
        assert "does not answer as an adb server" in server["error"]
        assert server["command"] == f"adb connect {fake.address}" == data["problem"]["command"]
    finally:
        fake.sock.close()


def test_a_phone_checked_on_one_adb_server_while_another_is_down_is_not_exit_0() -> None:
    # every phone of the reachable server passed: exit 0, though the other server's phones went unchecked
    checks = [CheckResult(name, Status.PASS, "fine") for name in CHECK_NAMES]
    up = ServerReport("127.0.0.1:5037", True, version=41, phones=1)
    down = ServerReport("bench2:5037", False, error="connection refused", command="adb -H bench2 devices -l")
    report = DoctorReport({"qhx_server": "0", "python": "3.11.0", "adbutils": "2", "adb": {}}, {}, [up, down],
                          [PhoneReport("s", up.address, "device", checks=checks)])
    assert report.exit_code == 1 and report.to_json()["ok"] is False
    assert "adb server bench2:5037 did not answer (its phones were not checked); exit status 1" in report.render()
    report.servers = [up]
    assert report.exit_code == 0


async def test_phones_checked_at_once_share_one_host_tokenizer() -> None:
    # each phone loaded its own copy of the same tokenizer.json (seconds of CPU and ~100 MB each)
    path = ensure_tokenizer_json()
    first, second = await asyncio.gather(_load(path), _load(path))
    assert first is second
