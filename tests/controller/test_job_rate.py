"""A rate-limited job spends its rate on blocks that still need a copy: blocks that clients'
writes made the target's own while the job waited are skipped, not paid for."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.agent.conftest import AgentFactory
from tests.controller.conftest import Controller, ControllerFactory
from tests.support.tls import qemu_nbd
from volkin.api.v1 import admin_pb2

pytestmark = pytest.mark.integration
MiB = 1 << 20
BLOCK = 64 << 10


def _qemu_io(c: Controller, volume: str, command: str) -> None:
    done = subprocess.run(["qemu-io", "-c", command, *qemu_nbd(c.nbd, volume)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "failed" not in done.stdout, done.stdout + done.stderr


def test_blocks_clients_wrote_ahead_of_a_slow_job_cost_it_no_time(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    c = start_controller("c1")
    for name in ("V1", "V2"):
        c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=4 * MiB,
                                                          block_size=BLOCK), timeout=30)
    _qemu_io(c, "V1", "write -P 0x11 0 4M")
    # 4 blocks a second: the 64 blocks would take 16 s.
    job = c.stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="V2", source="V1", rate_bytes_per_second=4 * BLOCK), timeout=30)
    # The client overwrites the first half at once: those 32 blocks need no copy any more.
    _qemu_io(c, "V2", "write -P 0x22 0 2M")
    written = c.stub.GetJob(admin_pb2.GetJobRequest(id=job.id), timeout=30).blocks_done
    assert written >= 32
    time.sleep(4.0)
    later = c.stub.GetJob(admin_pb2.GetJobRequest(id=job.id), timeout=30)
    assert later.state == admin_pb2.JOB_STATE_RUNNING
    # Spent on the second half: about 16 blocks in 4 s. Before, the job had given a slot
    # to every block when it started and spent the first 8 s on the overwritten ones.
    assert later.blocks_done - written >= 6, (written, later.blocks_done)
    # And it still keeps to its rate: not much more than 4 blocks a second.
    assert later.blocks_done - written <= 4 * 4 + 4 + 2
    _qemu_io(c, "V2", "read -P 0x22 0 2M")
    _qemu_io(c, "V2", "read -P 0x11 2M 2M")
