"""`volkin status` and `volkin agent list` on a dev cluster of real processes: a healthy
cluster, then one whose agent was killed, then one where it is back; then one whose etcd
does not answer."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.cli.conftest import DevCluster

pytestmark = pytest.mark.integration


def _status(cluster: DevCluster) -> tuple[int, dict[str, object], str]:
    done = cluster.cli("status", "-o", "json")
    return done.returncode, json.loads(done.stdout), done.stderr


@pytest.mark.slow
def test_status_tells_a_healthy_cluster_from_one_with_an_agent_down_or_etcd_unanswering(
        dev_dir: DevCluster) -> None:
    assert dev_dir.up("--agents", "2").returncode == 0
    dev_dir.ok("volume", "create", "held", "--size", "8MiB")  # extents on both agents

    code, healthy, _ = _status(dev_dir)
    assert code == 0 and healthy["healthy"] is True and healthy["problems"] == []
    controller = healthy["controller"]
    assert isinstance(controller, dict)
    assert controller["leader"] == controller["answered_by"] == "controller"
    assert controller["answered_by_leader"] is True and controller["epoch"] >= 1
    assert controller["admin_address"] == dev_dir.env["VOLKIN_CONTROLLER"]
    etcd = healthy["etcd"]
    assert isinstance(etcd, dict) and etcd["healthy"] is True and etcd["db_size_bytes"] > 0
    agents = healthy["agents"]
    assert isinstance(agents, list)
    assert [(a["node_id"], a["alive"]) for a in agents] == [("agent1", True), ("agent2", True)]
    assert all(a["capacity_bytes"] >= a["used_bytes"] > 0 and a["extents"] >= 1
               for a in agents)
    table = dev_dir.ok("status")
    assert "2 of 2 alive" in table and table.splitlines()[-1] == "health      ok"

    agent2 = dev_dir.status()["agent2"]
    os.kill(int(str(agent2["pid"])), signal.SIGKILL)
    time.sleep(0.5)
    code, down, stderr = _status(dev_dir)
    assert code == 3 and down["healthy"] is False
    assert stderr.count("\n") == 1 and stderr.startswith("volkin: cluster unhealthy: agent "
                                                         "agent2: registered but does not "
                                                         "answer")
    listed = dev_dir.json("agent", "list")
    assert [(a["node_id"], a["alive"]) for a in listed] == [("agent1", True),
                                                            ("agent2", False)]

    # Its lease expires (TTL 10 s by default): it holds extents, so it is still listed, down.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        code, down, stderr = _status(dev_dir)
        if "not registered" in stderr:
            break
        time.sleep(1)
    assert code == 3 and "agent agent2: holds extents but is not registered" in stderr

    assert dev_dir.up().returncode == 0  # starts agent2 again
    deadline = time.monotonic() + 30
    while (code := _status(dev_dir)[0]) != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert code == 0

    etcd = int(str(dev_dir.status()["etcd"]["pid"]))
    os.kill(etcd, signal.SIGSTOP)
    try:
        done = dev_dir.cli("status")
    finally:
        os.kill(etcd, signal.SIGCONT)
    assert done.returncode == 3
    assert done.stderr.startswith("volkin: cluster unhealthy: etcd: ") and done.stderr.count(
        "\n") == 1
    assert "controller  unknown: etcd cannot be read" in done.stdout
    deadline = time.monotonic() + 30
    while (code := _status(dev_dir)[0]) != 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert code == 0
