"""Cancel and set-rate are stored in the job's record: a new controller finds a cancelled
job still cancelled, not resumed, and a job's new rate as it was set."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.agent.conftest import AgentFactory
from tests.controller.conftest import ControllerFactory
from tests.support.tls import qemu_nbd
from volkin.api.v1 import admin_pb2

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_a_cancelled_job_stays_cancelled_and_a_set_rate_stays_set_across_a_failover(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    c1 = start_controller("c1")
    for name in ("V1", "V2", "V3"):
        c1.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=8 * MiB),
                             timeout=30)
    # Data to copy: a copy's rate counts the data it moves, and holes move none.
    written = subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 8M", *qemu_nbd(c1.nbd, "V1")],
                             capture_output=True, text=True,
                             timeout=60, check=False)
    assert written.returncode == 0, written.stdout + written.stderr
    cancelled = c1.stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="V2", source="V1", rate_bytes_per_second=256 << 10), timeout=30)
    slowed = c1.stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="V3", source="V1", rate_bytes_per_second=256 << 10), timeout=30)
    time.sleep(0.5)
    c1.stub.SetJobRate(admin_pb2.SetJobRateRequest(id=slowed.id, rate_bytes_per_second=64 << 10),
                       timeout=30)
    stopped = c1.stub.CancelJob(admin_pb2.CancelJobRequest(id=cancelled.id), timeout=30)
    assert stopped.state == admin_pb2.JOB_STATE_CANCELLED and not stopped.error
    assert 0 < stopped.blocks_done < stopped.blocks_total
    c1.kill()

    c2 = start_controller("c2")
    after = c2.stub.GetJob(admin_pb2.GetJobRequest(id=cancelled.id), timeout=30)
    assert after.state == admin_pb2.JOB_STATE_CANCELLED
    time.sleep(1.0)  # a resumed job would move on
    again = c2.stub.GetJob(admin_pb2.GetJobRequest(id=cancelled.id), timeout=30)
    assert again.blocks_done == stopped.blocks_done
    assert c2.stub.GetVolume(admin_pb2.GetVolumeRequest(name="V2"), timeout=30).source == "V1"
    rate = c2.stub.GetJob(admin_pb2.GetJobRequest(id=slowed.id), timeout=30)
    assert (rate.state, rate.rate_bytes_per_second) == (admin_pb2.JOB_STATE_RUNNING, 64 << 10)
