"""Pointed at a standby, the CLI does what it was asked on the active controller: the
standby refuses without changing anything and names the leader, and the CLI goes there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.agent.conftest import REPO, AgentFactory
from tests.controller.conftest import Controller, ControllerFactory
from volkin.api.v1 import admin_pb2

pytestmark = pytest.mark.integration


def _volkin(admin: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VOLKIN_CONTROLLER": admin}
    return subprocess.run([sys.executable, "-m", "volkin.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO)


def _admin_of(standby: Controller) -> str:
    """A standby's admin address, from its listening line."""
    found = re.search(r"event=controller\.listening .*admin=(\S+)", standby.log())
    assert found, standby.log()
    return found.group(1)


def test_a_command_sent_to_a_standby_is_carried_out_by_the_leader(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    leader = start_controller("c1")
    standby = start_controller("c2", standby=True)
    made = _volkin(_admin_of(standby), "volume", "create", "via-standby", "--size", "4MiB")
    assert made.returncode == 0, made.stderr
    assert made.stderr == ""
    names = {v.name for v in leader.stub.ListVolumes(admin_pb2.ListVolumesRequest(),
                                                     timeout=30).volumes}
    assert "via-standby" in names
    listed = _volkin(_admin_of(standby), "volume", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert "via-standby" in {v["name"] for v in json.loads(listed.stdout)}
    # The leader did it; the standby refused it, and audited the refusal.
    assert "event=audit.create_volume who=" in leader.log()
    assert "volume=via-standby size=4194304 block_size=0 result=ok" in leader.log()
    refused = [line for line in standby.log().splitlines() if "event=audit.create_volume" in line]
    assert len(refused) == 1 and "result=UNAVAILABLE" in refused[0]
