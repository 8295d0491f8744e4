"""The controller's /metrics, scraped from a real controller with a volume under refresh."""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.agent.conftest import REPO, AgentFactory
from tests.controller.conftest import Controller, ControllerFactory
from tests.support.tls import qemu_nbd
from volkin.api.v1 import admin_pb2

pytestmark = pytest.mark.integration
MiB = 1 << 20
BLOCKS = 128  # of 8 MiB volumes in 64 KiB blocks
DASHBOARD = REPO / "deploy" / "grafana" / "volkin.json"

# name -> [(labels, value)] of every sample (a counter's name ends in _total, a histogram's
# in _bucket, _sum, _count).
Samples = dict[str, list[tuple[dict[str, str], float]]]


def metrics_address(controller: Controller) -> str:
    found = re.search(r"event=controller\.listening .*metrics=(\S+)", controller.log())
    assert found is not None, controller.log()
    return found.group(1)


def parse(text: str) -> Samples:
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def scrape(address: str) -> Samples:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    found = [v for have, v in samples.get(name, []) if labels.items() <= have.items()]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def scrape_until_copying(address: str, job: str) -> Samples:
    """Scrapes until `job` shows a rate above 0 (a block copied since an earlier scrape at
    least a second before), at most for a minute."""
    deadline = time.monotonic() + 60
    while True:
        time.sleep(0.5)
        samples = scrape(address)
        if [v for labels, v in samples.get("volkin_controller_job_bytes_per_second", [])
                if labels["job"] == job and v > 0] or time.monotonic() > deadline:
            return samples


def qemu_io(controller: Controller, volume: str, *commands: str) -> None:
    argv = ["qemu-io"]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, *qemu_nbd(controller.nbd, volume)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


class Cluster(NamedTuple):
    controller: Controller
    metrics: str  # the controller's metrics address
    agent_metrics: tuple[str, ...]
    running: str  # job ids
    paused: str


def under_refresh(start_agent: AgentFactory, start_controller: ControllerFactory) -> Cluster:
    """Two agents, a controller, V1 written and V2 and V3 refreshed from it at 64 KiB/s (two
    minutes' work, a block a second), V3's job paused; then V1's last MiB written again.

    (The jobs' workers took every block with its time slot at the start; the blocks that
    write copied first still spend theirs, so it is the last MiB: the first copies of the
    running job come at once, a second apart.)"""
    agents = start_agent("a1"), start_agent("a2")
    c = start_controller("c1")
    for name in ("V1", "V2", "V3"):
        c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=8 * MiB),
                            timeout=30)
    qemu_io(c, "V1", "write -P 0x11 0 8M", "flush")
    qemu_io(c, "V2", "read 0 1M")
    running = c.stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="V2", source="V1", rate_bytes_per_second=64 << 10), timeout=30)
    paused = c.stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="V3", source="V1", rate_bytes_per_second=64 << 10), timeout=30)
    c.stub.PauseJob(admin_pb2.PauseJobRequest(id=paused.id), timeout=30)
    # 16 blocks since V1's last reference point, the last ones the jobs would copy.
    qemu_io(c, "V1", "write -P 0x22 7M 1M")
    return Cluster(c, metrics_address(c), tuple(a.metrics_address for a in agents), running.id,
                   paused.id)


def test_curl_of_metrics_shows_a_volume_under_refresh(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    _, address, _, running, paused = under_refresh(start_agent, start_controller)
    curl = subprocess.run(["curl", "-sf", f"http://{address}/metrics"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert curl.returncode == 0, curl.stderr
    samples = parse(curl.stdout)

    assert value(samples, "volkin_controller_leader") == 1
    assert value(samples, "volkin_controller_fencing_epoch") >= 1
    assert value(samples, "volkin_controller_lease_remaining_seconds") > 0

    # V2 reads through V1 and has blocks left to copy; V1 is real and was written since.
    assert value(samples, "volkin_controller_volume_info", volume="V2", source="V1",
                 kind="primary") == 1
    assert value(samples, "volkin_controller_volume_blocks", volume="V2") == BLOCKS
    to_copy = value(samples, "volkin_controller_volume_blocks_to_copy", volume="V2")
    valid = value(samples, "volkin_controller_volume_blocks_valid", volume="V2")
    assert to_copy > 0 and valid + to_copy == BLOCKS
    assert value(samples, "volkin_controller_volume_blocks_to_copy", volume="V1") == 0
    assert value(samples, "volkin_controller_volume_blocks_valid", volume="V1") == BLOCKS
    assert value(samples, "volkin_controller_volume_blocks_modified", volume="V1") == 16
    assert value(samples, "volkin_controller_volume_blocks_modified", volume="V2") == 0
    assert value(samples, "volkin_controller_volume_allocated_bytes", volume="V1") >= 8 * MiB
    assert value(samples, "volkin_controller_volume_allocated_age_seconds", volume="V1") >= 0

    # The jobs: one running, one paused, each in exactly one state.
    for job, state in ((running, "running"), (paused, "paused")):
        states = {labels["state"]: v for labels, v in samples["volkin_controller_job_state"]
                  if labels["job"] == job}
        assert states[state] == 1 and sum(states.values()) == 1, states
        assert value(samples, "volkin_controller_job_blocks", job=job) == BLOCKS
        done = value(samples, "volkin_controller_job_blocks_done", job=job)
        assert 0 <= done < BLOCKS
        assert value(samples, "volkin_controller_job_progress_ratio", job=job) == done / BLOCKS
        assert value(samples, "volkin_controller_job_rate_limit_bytes_per_second",
                     job=job) == 64 << 10
    assert value(samples, "volkin_controller_job_bytes_per_second", job=paused) == 0
    assert value(samples, "volkin_controller_jobs", state="running") == 1
    assert value(samples, "volkin_controller_jobs", state="paused") == 1

    # Events: NBD requests by operation, map commits, etcd transactions.
    for op in ("read", "write", "flush"):
        assert value(samples, "volkin_controller_nbd_requests_total", op=op, result="ok") > 0
        assert value(samples, "volkin_controller_nbd_request_seconds_count", op=op) > 0
    assert value(samples, "volkin_controller_nbd_bytes_total", op="write") == 9 * MiB
    assert value(samples, "volkin_controller_nbd_bytes_total", op="read") == MiB
    assert value(samples, "volkin_controller_map_commits_total") > 0
    assert value(samples, "volkin_controller_map_commit_batch_size_count") > 0
    assert value(samples, "volkin_controller_etcd_txn_seconds_count") > 0


def test_a_running_job_reports_its_rate_and_eta_from_the_second_scrape_on(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    cluster = under_refresh(start_agent, start_controller)
    job = cluster.running
    first = scrape(cluster.metrics)
    assert not [labels for labels, _ in first.get("volkin_controller_job_bytes_per_second", [])
                if labels["job"] == job]
    samples = scrape_until_copying(cluster.metrics, job)
    rate = value(samples, "volkin_controller_job_bytes_per_second", job=job)
    assert 0 < rate < 4 * (64 << 10)  # near its limit, give or take the scrapes' timing
    left = BLOCKS - value(samples, "volkin_controller_job_blocks_done", job=job)
    eta = value(samples, "volkin_controller_job_eta_seconds", job=job)
    assert eta == pytest.approx(left * (64 << 10) / rate)


def test_a_standby_reports_that_it_does_not_lead_and_no_volumes(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    active = start_controller("c1")
    active.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V1", size_bytes=MiB),
                             timeout=30)
    standby = start_controller("c2", standby=True)
    samples = scrape(metrics_address(standby))
    assert value(samples, "volkin_controller_leader") == 0
    assert value(samples, "volkin_controller_lease_remaining_seconds") == 0
    assert "volkin_controller_volume_blocks" not in samples
    assert value(scrape(metrics_address(active)), "volkin_controller_leader") == 1


def dashboard_series() -> set[str]:
    """The volkin series the dashboard's queries name (as exposed: with _total, _bucket)."""
    dashboard = json.loads(Path(DASHBOARD).read_text())
    exprs = [target["expr"] for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    exprs += [v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
              for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for expr in exprs for name in re.findall(r"\bvolkin_[a-z0-9_]+", expr)}


def test_every_series_the_grafana_dashboard_queries_is_exported(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    cluster = under_refresh(start_agent, start_controller)
    scrape(cluster.metrics)  # the first sample of the jobs' rates
    exported = set(scrape_until_copying(cluster.metrics, cluster.running))
    for address in cluster.agent_metrics:
        exported |= set(scrape(address))
    wanted = dashboard_series()
    assert {"volkin_controller_volume_blocks_to_copy", "volkin_agent_operation_seconds_bucket",
            "volkin_controller_job_eta_seconds"} <= wanted
    assert wanted - exported == set()
