"""Background copy jobs as an operator steers them: rate after a pause, set-rate, cancel,
wait with a timeout. The CLI process against a dev cluster of real processes."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.cli.conftest import DevCluster, one_error_line

pytestmark = pytest.mark.integration
MiB = 1 << 20
KiB = 1 << 10


def _job(cluster: DevCluster, job_id: str) -> dict[str, Any]:
    job = cluster.json("job", "show", job_id)
    assert isinstance(job, dict)
    return job


def _held_still(cluster: DevCluster, job_id: str, quiet: float = 1.0) -> int:
    """Waits until the job's progress has not moved for `quiet` seconds; returns it."""
    held, since, deadline = -1, time.monotonic(), time.monotonic() + 20
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.2)
        now = _job(cluster, job_id)["blocks_done"]
        if now != held:
            held, since = now, time.monotonic()
    return held


def _volumes(cluster: DevCluster, *names: str, size: str) -> None:
    for name in names:
        cluster.ok("volume", "create", name, "--size", size, "--block-size", "64KiB")


def test_a_resumed_job_keeps_its_rate_instead_of_bursting_to_catch_up(
        dev_cluster: DevCluster) -> None:
    # 512 blocks of 64 KiB at 1 MiB/s: 16 blocks a second.
    _volumes(dev_cluster, "r-src", "r-dst", size="32MiB")
    job_id = dev_cluster.json("refresh", "r-dst", "--from", "r-src", "--rate", "1MiB")["id"]
    time.sleep(1.5)
    dev_cluster.ok("job", "pause", job_id)
    before = _held_still(dev_cluster, job_id)
    time.sleep(4.0)  # the pause must not count as time the job may catch up on

    dev_cluster.ok("job", "resume", job_id)
    resumed = time.monotonic()
    time.sleep(1.0)
    after = _job(dev_cluster, job_id)["blocks_done"]
    elapsed = time.monotonic() - resumed
    # At most the rate over the time since the resume, plus a second's worth for the
    # blocks a worker had in hand (and the CLI's own latency).
    allowed = int((elapsed + 1.0) * 16)
    assert after - before <= allowed, (
        f"{after - before} blocks in {elapsed:.1f} s after the resume; the rate allows "
        f"{allowed}")
    dev_cluster.ok("volume", "delete", "r-dst")
    dev_cluster.ok("volume", "delete", "r-src")
