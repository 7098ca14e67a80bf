"""`qhx-server provision` against simulated phones behind the real adb server (no mocks).

The bundle is made in a temp folder to look like the model card's v81/ (a manifest as staging writes
it, a few MB of random .bin files named as on the card, a tokenizer.json stand-in); phones come from a
lab of this module, one new phone per test so that every test starts from a freshly staged phone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import adbutils
import pytest

from server import cli
from server.ops.progress import LiveProgress, Progress
from server.ops.provision import InvalidBundle, PhoneReport, Plan, plan_files, provision
from server.settings import Settings
from server.sim.harness import SimLab, SimPhone
from server.sim.staging import MANIFEST_NAME, manifest

ROOT = "/data/local/tmp/wq"
MB = 1_000_000
BUNDLE_FILES = {  # name -> size: the card's files, scaled down
    "qwen3508b_decode_f16.bin": 3 * MB,
    "qwen3508b_lmhead_f16.bin": 3 * MB // 2,
    "qwen3508b_embed_f16.bin": 3 * MB // 2,
}


def make_bundle(folder: Path, precision: str = "fp16") -> Path:
    folder.mkdir(parents=True)
    plan = manifest(precision)
    (folder / MANIFEST_NAME).write_text(json.dumps(plan, indent=2))
    for name, size in BUNDLE_FILES.items():
        if precision == "w8":
            name = name.replace("decode_f16", "decode_w8")
        (folder / name).write_bytes(os.urandom(size))
    vocab = {f"tok{i}": i for i in range(20_000)}
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}}))
    return folder


@pytest.fixture(scope="module")
def lab() -> Iterator[SimLab]:
    with SimLab(phones=0, speed=0) as lab:
        yield lab


@pytest.fixture(scope="module")
def settings(lab: SimLab) -> Settings:
    return Settings(adb_servers=[lab.adb_server], adb_timeout_s=5.0)


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    return plan_files(make_bundle(tmp_path_factory.mktemp("card") / "v81"))


@pytest.fixture
def phone(lab: SimLab) -> Iterator[SimPhone]:
    sim = lab.add_phone()
    yield sim
    lab.remove_phone(sim.serial)


def on_phone(sim: SimPhone, rel: str, root: str = ROOT) -> Path:
    return sim.phone_path(f"{root}/{rel}")


def assert_on_phone(sim: SimPhone, plan: Plan, root: str = ROOT) -> None:
    for f in plan.files:
        assert on_phone(sim, f.rel, root).read_bytes() == f.path.read_bytes(), f.rel
        assert not on_phone(sim, f.rel + ".part", root).exists()


def tree(sim: SimPhone) -> dict[str, tuple[int, int]]:
    """Every file under the device root: size and mtime (ns)."""
    base = on_phone(sim, "")
    return {str(p.relative_to(base)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(base.rglob("*")) if p.is_file()}


class Recorder(Progress):
    """Counts what the progress events report (the files started and the bytes sent)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.bytes = 0

    def start_file(self, name: str, size: int) -> None:
        self.started.append(name)

    def advance(self, nbytes: int) -> None:
        self.bytes += nbytes


class Unplug(Recorder):
    """Cuts the phone's link once the second file pushed has sent ``after`` bytes."""

    def __init__(self, sim: SimPhone, after: int) -> None:
        super().__init__()
        self.sim, self.after, self.file_bytes, self.done = sim, after, 0, False

    def start_file(self, name: str, size: int) -> None:
        super().start_file(name, size)
        self.file_bytes = 0

    def advance(self, nbytes: int) -> None:
        super().advance(nbytes)
        self.file_bytes += nbytes
        if len(self.started) == 2 and self.file_bytes >= self.after and not self.done:
            self.done = True
            self.sim.drop_connections()


def reconnect(lab: SimLab, serial: str) -> None:
    """The adb server reconnects a dropped TCP phone by itself; nudge it if it is slow."""
    try:
        lab.wait_for_devices([serial], timeout=5)
    except TimeoutError:
        lab.adb("connect", serial)
        lab.wait_for_devices([serial], timeout=10)


def run(plan: Plan, settings: Settings, sim: SimPhone, progress: Progress | None = None) -> PhoneReport:
    [report] = provision(plan, settings, serials=[sim.serial], progress=progress)
    return report


# --------------------------------------------------------------------------- with phones


def test_bundle_is_pushed_verified_and_a_second_run_skips_every_file(
        plan: Plan, settings: Settings, phone: SimPhone) -> None:
    rels = [f.rel for f in plan.files]
    assert rels[-1] == f"qwen35/{MANIFEST_NAME}"  # the manifest goes last

    progress = Recorder()
    first = run(plan, settings, phone, progress)
    assert first.ok, first.error
    assert first.pushed == rels and first.skipped == []
    assert first.bytes_sent == progress.bytes == plan.total_bytes > 6 * MB
    assert first.verified == len(rels) and first.soc == "SM8850"
    assert_on_phone(phone, plan)

    progress = Recorder()
    second = run(plan, settings, phone, progress)
    assert second.ok, second.error
    assert (second.pushed, second.renamed, second.bytes_sent, progress.started) == ([], [], 0, [])
    assert second.skipped == rels and second.verified == len(rels)


def test_changed_file_is_pushed_again_and_a_complete_part_file_is_only_renamed(
        plan: Plan, settings: Settings, phone: SimPhone) -> None:
    assert run(plan, settings, phone).ok
    decode, lmhead = "qwen35/qwen3508b_decode_f16.bin", "qwen35/qwen3508b_lmhead_f16.bin"
    target = on_phone(phone, decode)
    target.write_bytes(b"\0" * target.stat().st_size)  # same size, other bytes: only sha256 tells
    on_phone(phone, lmhead).rename(on_phone(phone, lmhead + ".part"))  # pushed, never renamed

    report = run(plan, settings, phone)
    assert report.ok, report.error
    assert report.pushed == [decode]
    assert report.bytes_sent == target.stat().st_size
    # the manifest was kept out of the way while the bundle changed, then put back
    assert sorted(report.renamed) == sorted([lmhead, f"qwen35/{MANIFEST_NAME}"])
    assert_on_phone(phone, plan)


def test_unplugged_push_resumes_with_the_unfinished_files_only(
        lab: SimLab, plan: Plan, settings: Settings, phone: SimPhone) -> None:
    cut = Unplug(phone, after=256 * 1024)
    first = run(plan, settings, phone, cut)
    assert not first.ok and cut.done
    assert first.error is not None and "broke after" in first.error
    done, broken = cut.started
    assert first.pushed == [done]
    # cut off mid-file (what was in flight is lost: the .part may not even exist yet)...
    partial = on_phone(phone, broken + ".part")
    assert not partial.exists() or partial.stat().st_size < plan.files[1].size
    assert on_phone(phone, broken).stat().st_size == 4096  # ...and the staged file left alone
    assert not on_phone(phone, f"qwen35/{MANIFEST_NAME}").exists()  # not servable meanwhile

    reconnect(lab, phone.serial)
    progress = Recorder()
    second = run(plan, settings, phone, progress)
    assert second.ok, second.error
    rels = [f.rel for f in plan.files]
    assert second.skipped == [done]
    assert second.pushed == progress.started == rels[1:]
    assert second.bytes_sent == sum(f.size for f in plan.files[1:])
    assert_on_phone(phone, plan)


def test_soc_mismatch_is_refused_before_anything_is_pushed(lab: SimLab, plan: Plan, settings: Settings) -> None:
    sim = lab.add_phone(soc="SM8650")
    try:
        before = tree(sim)
        progress = Recorder()
        report = run(plan, settings, sim, progress)
        assert not report.ok and report.soc == "SM8650"
        assert report.error is not None
        assert "v81" in report.error and "SM8650" in report.error and "nothing pushed" in report.error
        assert (report.bytes_sent, report.pushed, progress.started) == (0, [], [])
        assert tree(sim) == before
    finally:
        lab.remove_phone(sim.serial)


def test_runtime_files_go_to_a_new_device_root_and_qhx_generate_is_executable(
        lab: SimLab, settings: Settings, phone: SimPhone, tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    exe = runtime / "qhx_generate"
    exe.write_text("#!/bin/sh\necho provisioned runtime \"$@\"\n")
    exe.chmod(0o644)  # not executable here: the phone copy must be anyway
    (runtime / "libQnnHtp.so").write_bytes(os.urandom(200_000))
    plan = plan_files(make_bundle(tmp_path / "v81"), runtime)
    assert [f.rel for f in plan.files][:2] == ["libQnnHtp.so", "qhx_generate"]

    root = "/data/local/tmp/fresh/wq"  # not there yet
    report = run(plan, settings.model_copy(update={"device_root": root}), phone)
    assert report.ok, report.error
    assert_on_phone(phone, plan, root)
    assert on_phone(phone, "qhx_generate", root).stat().st_mode & 0o111
    device = adbutils.AdbClient(port=lab.adb_port).device(phone.serial)
    assert device.shell(f"cd {root} && ./qhx_generate ok", timeout=10) == "provisioned runtime ok"


def test_cli_all_provisions_every_phone_and_reports_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    bundle = make_bundle(tmp_path / "v81-w8", precision="w8")
    with SimLab(phones=2, speed=0) as lab:
        good = [p.serial for p in lab.phones]
        bad = lab.add_phone(soc="SM8650")
        argv = ["provision", "--bundle", str(bundle), "--all", "--adb-server", lab.adb_server]
        assert cli.main(argv) == 1
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == 3
        assert sorted(line.split()[0] for line in lines if ": ok," in line) == sorted(good)
        assert next(line for line in lines if "FAILED" in line).startswith(bad.serial)
        for sim in lab.phones[:2]:  # w8 lands in qwen35-w8 by default, next to the staged qwen35
            assert on_phone(sim, "qwen35-w8/qwen3508b_decode_w8.bin").stat().st_size == 3 * MB
            assert on_phone(sim, "qwen35/qwen3508b_decode_f16.bin").stat().st_size == 4096

        assert cli.main([*argv[:3], "--serial", good[0], "--adb-server", lab.adb_server]) == 0
        assert ": ok, pushed 0 " in capsys.readouterr().out


# --------------------------------------------------------------------------- local side only


def test_plan_names_the_phone_folder_by_precision_unless_told(tmp_path: Path) -> None:
    assert plan_files(make_bundle(tmp_path / "a")).name == "qwen35"
    w8 = plan_files(make_bundle(tmp_path / "b", precision="w8"))
    assert (w8.name, w8.precision) == ("qwen35-w8", "w8")
    assert plan_files(tmp_path / "b", name="mine").files[0].rel.startswith("mine/")


def test_plan_refuses_a_folder_without_manifest_and_infers_arch_from_the_card_folder(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "v81")
    (bundle / MANIFEST_NAME).write_text(json.dumps({"format": "qhexrt-manifest/1"}))
    assert plan_files(bundle).arch == {"arch": "v81"}
    shutil.copytree(bundle, tmp_path / "other")
    (tmp_path / "other" / MANIFEST_NAME).rename(tmp_path / "other" / "plan.json")
    with pytest.raises(InvalidBundle, match="manifest"):
        plan_files(tmp_path / "other")


def test_live_progress_draws_one_bar_per_phone_on_a_terminal_and_lines_elsewhere() -> None:
    for tty in (True, False):
        out = io.StringIO()
        with LiveProgress(out, tty=tty) as progress:
            views = [progress.phone(serial) for serial in ("phoneA", "phoneB")]
            for view in views:
                view.begin("push", 1, 2000)
                view.start_file("qwen35/x.bin", 2000)
                view.advance(1000)
            progress._bars.refresh()  # draw now: both bars are live at once
            for view in views:
                view.advance(1000)
                view.end_file(True)
                view.end()
        text = out.getvalue()
        for serial in ("phoneA", "phoneB"):
            assert f"{serial}: ok   qwen35/x.bin 2.0 kB" in text and f"{serial}: push: 1/1 file(s)" in text
        drawn = "phoneA: push: qwen35/x.bin (1/1)" in text and "phoneB: push: qwen35/x.bin (1/1)" in text
        assert (drawn and "━" in text) if tty else ("━" not in text and "\x1b" not in text)


class Rendezvous(Progress):
    """Every phone's first pushed chunk waits until ``phones`` phones are pushing at the same time:
    with pushes one phone after another the barrier breaks (BrokenBarrierError fails the push)."""

    def __init__(self, phones: int) -> None:
        self.barrier = threading.Barrier(phones, timeout=15)
        self.met: list[str] = []

    def phone(self, serial: str) -> Progress:
        outer = self

        class View(Progress):
            waited = False

            def advance(self, nbytes: int) -> None:
                if not self.waited:
                    self.waited = True
                    outer.barrier.wait()
                    outer.met.append(serial)

        return View()


def test_phones_are_provisioned_in_parallel_up_to_the_bound(lab: SimLab, plan: Plan, settings: Settings) -> None:
    phones = [lab.add_phone(), lab.add_phone()]
    serials = [p.serial for p in phones]
    try:
        rendezvous = Rendezvous(2)
        reports = provision(plan, settings, serials=serials, progress=rendezvous, parallel=2)
        assert [r.serial for r in reports] == serials and all(r.ok for r in reports), reports
        assert sorted(rendezvous.met) == sorted(serials)
        for sim in phones:
            assert_on_phone(sim, plan)

        for sim in phones:  # again from scratch, one phone at a time: the two never push together
            on_phone(sim, plan.files[0].rel).unlink()
        rendezvous = Rendezvous(2)
        rendezvous.barrier = threading.Barrier(2, timeout=2)
        with pytest.raises(threading.BrokenBarrierError):
            provision(plan, settings, serials=serials, progress=rendezvous, parallel=1)
        assert rendezvous.met == []
    finally:
        for sim in phones:
            lab.remove_phone(sim.serial)


def test_ctrl_c_stops_every_phone_at_once_with_130_and_leaves_nothing_running(
        lab: SimLab, tmp_path: Path) -> None:
    # the phones' jobs ran in a thread pool that Ctrl-C had to wait for (every push and phone-side hash
    # to the end: minutes for a bench), then a traceback
    phones = [lab.add_phone(), lab.add_phone()]
    started = tmp_path / "hashing"
    started.mkdir()
    for sim in phones:  # these phones hash slowly: the jobs are busy on them when Ctrl-C comes
        slow = sim.phone_path("/system/bin/sha256sum")
        slow.write_text(f"#!/bin/sh\necho $$ > {started}/$$\nexec sleep 600\n")
        slow.chmod(0o755)
    bundle = make_bundle(tmp_path / "v81")
    argv = ["provision", "--bundle", str(bundle), "--adb-server", lab.adb_server, "--adb-timeout-s", "300",
            *(a for sim in phones for a in ("--serial", sim.serial))]
    child = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
            "from server.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", child, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for _ in range(1200):  # until both phones hash (bounded: 120 s)
            if len(list(started.iterdir())) >= len(phones) or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)  # not the 300 s each hash may take
        assert proc.returncode == 130, err
        assert "interrupted" in err and "run the same command again to resume" in err and "Traceback" not in err
        pids = [int(p.read_text()) for p in started.iterdir() if p.read_text().strip()]
        for _ in range(100):  # the phones' processes go with the streams (bounded: 10 s)
            if not any(Path(f"/proc/{pid}").exists() for pid in pids):
                break
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in pids), "sha256sum still runs on a phone"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for sim in phones:
            lab.remove_phone(sim.serial)
