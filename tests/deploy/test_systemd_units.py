"""deploy/systemd: the units pass `systemd-analyze verify` with nothing to say, the
program each starts is a console script of the package that runs, the config files
they name load with the daemons' own loaders, and the hardening keeps exposure low.

verify insists that ExecStart's program exists and is executable. The package is not
installed to /usr/local/bin here (that would replace the shared machine's scripts), so
each unit is verified from a copy whose ExecStart points at a stand-in made from the
console script's entry point in pyproject.toml: the same module and function."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from agent import config as agent_config
from controller import config as controller_config
from tests.deploy.render import REPO

SYSTEMD = REPO / "deploy" / "systemd"
UNITS = sorted(SYSTEMD.glob("*.service"))
SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
    "scripts"]
ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None and not os.environ.get("CI"),
                                reason="systemd-analyze is not installed (.ci/install does)")


def exec_start(unit: Path) -> list[str]:
    (line,) = re.findall(r"^ExecStart=(.*)$", unit.read_text(), re.M)
    return str(line).split()


def stand_in(program: str, directory: Path) -> Path:
    """An executable that runs `program`'s entry point (module:function) from this tree."""
    module, function = SCRIPTS[Path(program).name].split(":")
    path = directory / Path(program).name
    path.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -c "
                    f"'import sys; from {module} import {function}; sys.argv[0] = "
                    f"\"{path.name}\"; {function}()' \"$@\"\n")
    path.chmod(0o755)
    return path


def verify(unit_text: str, name: str, tmp_path: Path) -> str:
    """What `systemd-analyze verify` says about the unit (warnings included)."""
    assert ANALYZE is not None, "systemd-analyze is required in CI"
    program = unit_text.split("ExecStart=", 1)[1].split()[0]
    shim = stand_in(program, tmp_path)
    unit = tmp_path / name
    unit.write_text(unit_text.replace(f"ExecStart={program}", f"ExecStart={shim}"))
    result = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                            timeout=120)
    # verify also reports on units of the host it loads; keep what names ours.
    lines = [line for line in (result.stdout + result.stderr).splitlines() if name in line]
    if result.returncode != 0:
        lines.append(f"exit code {result.returncode}")
    return "\n".join(lines)


def test_there_is_a_unit_for_the_agent_and_one_for_the_controller() -> None:
    assert [u.name for u in UNITS] == ["volkin-agent.service", "volkin-controller.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_analyze_verify_has_nothing_to_say_about_the_unit(unit: Path,
                                                                   tmp_path: Path) -> None:
    assert verify(unit.read_text(), unit.name, tmp_path) == ""


def test_verify_reports_a_misspelt_setting_so_the_test_above_can_fail(tmp_path: Path) -> None:
    text = (SYSTEMD / "volkin-agent.service").read_text()
    said = verify(text.replace("NoNewPrivileges=", "NoNewPrivilege="), "volkin-agent.service",
                  tmp_path)
    assert "Unknown key" in said and "NoNewPrivilege" in said


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_the_unit_starts_a_console_script_of_the_package_that_runs(unit: Path,
                                                                   tmp_path: Path) -> None:
    program, *args = exec_start(unit)
    assert program == f"/usr/local/bin/{unit.stem}"  # where pip puts console scripts
    assert unit.stem in SCRIPTS
    result = subprocess.run([str(stand_in(program, tmp_path)), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "--config" in result.stdout, result.stderr
    assert args[0] == "--config"


def test_the_agent_config_file_loads_and_keeps_data_in_the_units_state_directory() -> None:
    settings = agent_config.load(["--config", str(SYSTEMD / "agent.toml")], {})
    state = re.search(r"^StateDirectory=(\S+)$", (SYSTEMD / "volkin-agent.service").read_text(),
                      re.M)
    assert state is not None and str(settings.data_dir) == f"/var/lib/{state.group(1)}"
    assert len(settings.etcd_endpoints) == 3
    assert exec_start(SYSTEMD / "volkin-agent.service")[1:] == ["--config",
                                                               "/etc/volkin/agent.toml"]


def test_the_controller_config_file_loads() -> None:
    settings = controller_config.load(["--config", str(SYSTEMD / "controller.toml")], {})
    assert settings.node_id == "ctl-node1" and len(settings.etcd_endpoints) == 3
    assert exec_start(SYSTEMD / "volkin-controller.service")[1:] == [
        "--config", "/etc/volkin/controller.toml"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_the_hardening_leaves_the_unit_little_exposure(unit: Path, tmp_path: Path) -> None:
    assert ANALYZE is not None
    program = exec_start(unit)[0]
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace(program, str(stand_in(program, tmp_path))))
    result = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(copy)],
                            capture_output=True, text=True, timeout=120)
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= 2.5, result.stdout
