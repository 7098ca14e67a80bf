"""The short fault soak (benchmarks/soak.py, about 40 s): the whole stack on 8 simulated phones, a
mixed workload, random faults (crashes, hangs, garbage, dropped and refused links, phones unplugged,
the adb server killed). Every request ends in a completion or a clean OpenAI error, nothing hangs, and
afterwards no phone process, asyncio task or memory is left over. The long run is the script's."""

from __future__ import annotations

import pytest

from benchmarks.soak import Config, run


@pytest.mark.timeout(420)
def test_a_short_run_of_mixed_requests_under_random_faults_leaves_nothing_behind() -> None:
    # 40 s: the suite's budget (the 10,000-request run is the script's); faults every second and an adb
    # server killed every 15 s still give each kind of fault a few times
    report = run(Config(requests=300, time_limit_s=40, phones=8, speed=2, fault_every_s=1.0,
                        adb_kill_every_s=15))
    summary = "\n".join(report.lines())
    assert report.requests >= 100, summary  # the machine may be slow; the bound is the time limit
    assert report.kinds["completed"] >= report.requests // 4, summary
    assert sum(report.faults.values()) >= 10 and report.faults["adb_kill"] >= 1, summary
    assert not report.hung, summary
    assert not report.unexplained, summary
    assert report.tracebacks == 0, summary
    assert report.settled, summary
    assert report.leaked_procs == 0, summary
    assert report.tasks_end == report.tasks_warm, summary
    assert report.rss_flat, summary
