"""The simulated phone's ``dumpsys`` (server/sim/dumpsys.py): Android's format, read back by the host's
parsers (server/backends/adb/dumpsys.py) for any body, and through the real adb server as an operator
would type it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.backends.adb.dumpsys import ThermalStatus, parse_battery, parse_thermalservice
from server.sim.dumpsys import render_battery, render_thermalservice
from server.sim.harness import SimLab, SimPhone
from server.sim.physics import Body, thermal_status
from server.sim.simconfig import SimConfig

CFG = SimConfig()


# a sensor reading exactly 0.0 is how Android shows an absent one: the host skips it, whatever phone says it
@given(temp=st.floats(-20, 120).filter(lambda t: abs(t) >= 0.01), battery=st.floats(0, 100), working=st.booleans(), charging=st.booleans())
def test_the_host_reads_back_what_the_simulated_phone_reports(temp: float, battery: float, working: bool,
                                                              charging: bool) -> None:
    cfg = SimConfig(charging=charging)
    body = Body(0.0, temp, battery, 10.0 if working else 0.0)
    thermal = parse_thermalservice(render_thermalservice(body, cfg, 5.0))
    assert thermal.error is None and thermal.status == thermal_status(temp, cfg)
    assert thermal.temperature_c == pytest.approx(round(temp, 2))  # the skin sensor
    assert thermal.sensor is not None and thermal.sensor.name == "VIRTUAL-SKIN"
    level = parse_battery(render_battery(body, cfg))
    assert level.level_pct == round(battery) and level.charging is charging and not level.updates_stopped


@pytest.fixture(scope="module")
def phone() -> Iterator[tuple[SimLab, SimPhone]]:
    with SimLab(phones=1, speed=0) as lab:
        yield lab, lab.phones[0]


def shell(lab: SimLab, *args: str) -> str:
    result = lab.adb("-s", lab.phones[0].serial, "shell", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dumpsys_through_adb_reports_the_temperature_the_knob_set(phone: tuple[SimLab, SimPhone]) -> None:
    lab, sim = phone
    sim.configure(temp_c=45.0)
    reading = parse_thermalservice(shell(lab, "dumpsys", "thermalservice"))
    assert reading.status is ThermalStatus.SEVERE and reading.temperature_c == 45.0
    sim.configure(temp_c=30.0)
    assert parse_thermalservice(shell(lab, "dumpsys", "thermalservice")).status is ThermalStatus.NONE


def test_dumpsys_battery_set_and_unplug_change_what_is_reported_until_reset(phone: tuple[SimLab, SimPhone]) -> None:
    lab, sim = phone
    sim.configure(battery_pct=80)
    shell(lab, "dumpsys", "battery", "set", "level", "7")
    shell(lab, "dumpsys", "battery", "unplug")
    faked = parse_battery(shell(lab, "dumpsys", "battery"))
    assert (faked.level_pct, faked.plugged, faked.updates_stopped) == (7.0, False, True)
    shell(lab, "dumpsys", "battery", "reset")
    real = parse_battery(shell(lab, "dumpsys", "battery"))
    assert (real.level_pct, real.charging, real.updates_stopped) == (80.0, True, False)


def test_an_unknown_service_is_not_found_as_on_android(phone: tuple[SimLab, SimPhone]) -> None:
    lab, _ = phone
    result = lab.adb("-s", lab.phones[0].serial, "shell", "dumpsys", "wifi")
    assert "Can't find service: wifi" in result.stdout + result.stderr
    assert "battery" in shell(lab, "dumpsys")
