"""Every byte through the data path, checked by fio's own verification: four NBD connections
at once, block sizes from 4 KiB to 1 MiB (most of them not whole volume blocks), while a
snapshot and a running refresh make the first write of each block copy it elsewhere first.

Real processes throughout: etcd, two agents, the controller, fio's nbd engine, qemu-io.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.agent.conftest import AgentFactory
from tests.controller.conftest import ControllerFactory
from tests.controller.test_daemon import qemu_io, wait_job
from tests.support.tls import fio_nbd
from volkin.api.v1 import admin_pb2

pytestmark = pytest.mark.integration

MiB = 1 << 20
JOBS = 4
REGION = 4_000_000  # each connection writes and verifies its own region
# Sizes in thousands of bytes: fio aligns offsets to the smallest, so nearly every request
# starts and ends off the 512-byte and 64 KiB boundaries (a part of a block merges with
# what the block holds), and the large ones also cover whole blocks in between.
BSSPLIT = "1000/5:3000/15:9000/10:65000/25:200000/15:1000000/30"


def fio(nbd: str, volume: str, *options: str) -> list[dict[str, Any]]:
    """Runs fio's nbd engine with JOBS connections; returns each job's JSON result."""
    prefix, uri = fio_nbd(nbd, volume)
    argv = [*prefix, "fio", "--name=integrity", "--ioengine=nbd", f"--uri={uri}",
            f"--numjobs={JOBS}", f"--size={REGION}", f"--offset_increment={REGION}",
            f"--bssplit={BSSPLIT}", "--iodepth=8", "--verify=crc32c", "--verify_interval=1000",
            "--verify_fatal=1", "--verify_state_save=0",
            "--randrepeat=1", "--output-format=json", *options]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    start = result.stdout.index("{")  # fio may print notes before its JSON
    jobs = json.loads(result.stdout[start:])["jobs"]
    assert len(jobs) == JOBS
    for job in jobs:
        assert job["error"] == 0, job
    return list(jobs)


def moved(jobs: list[dict[str, Any]], direction: str) -> int:
    return sum(int(job[direction]["io_bytes"]) for job in jobs)


def test_fio_verifies_mixed_block_sizes_over_four_connections_during_a_snapshot_and_refresh(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1"), start_agent("a2")
    c = start_controller("c1")
    size = 16 * MiB  # JOBS regions, and a little more that fio leaves alone
    for name in ("V", "W"):
        c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=size))
    qemu_io(c.nbd, "V", f"write -P 0x5a 0 {size}")
    c.stub.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V", name="S"))
    # W becomes V as it is now; slowly, so that fio's first writes to V find most blocks
    # not yet copied (each must reach W before V's block is overwritten).
    job = c.stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="W", source="V", rate_bytes_per_second=4 * MiB))

    written = fio(c.nbd, "V", "--rw=randwrite", "--do_verify=1")
    assert moved(written, "write") == JOBS * REGION
    # Read back through new connections, each verifying what another wrote.
    verified = fio(c.nbd, "V", "--rw=randwrite", "--verify_only")
    assert moved(verified, "read") == JOBS * REGION

    assert wait_job(c, job.id).state == admin_pb2.JOB_STATE_DONE
    qemu_io(c.nbd, "S", f"read -P 0x5a 0 {size}")  # the snapshot kept V before fio
    qemu_io(c.nbd, "W", f"read -P 0x5a 0 {size}")  # and so did the refresh's copy
