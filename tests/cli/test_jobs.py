"""Background copy jobs as an operator steers them: rate after a pause, set-rate, cancel,
wait with a timeout. The CLI process against a dev cluster of real processes."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest

from tests.cli.conftest import DevCluster, one_error_line
from volkin import nbdargs

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


def _volumes(cluster: DevCluster, source: str, *others: str, size: str) -> None:
    """The volumes, the first one (a refresh's source) written all over: a copy's rate
    counts the data it moves, and holes move none."""
    for name in (source, *others):
        cluster.ok("volume", "create", name, "--size", size, "--block-size", "64KiB")
    _qemu_io(cluster, source, f"write -P 0x5a 0 {size.removesuffix('iB')}")


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


def _qemu_io(cluster: DevCluster, volume: str, command: str) -> None:
    """Runs one qemu-io command on the volume over NBD; a failed pattern check fails."""
    done = subprocess.run(["qemu-io", *nbdargs.qemu(cluster.env["VOLKIN_NBD"], volume,
                                                     cluster.env.get(nbdargs.ENV_TLS_DIR)),
                           "-c", command], capture_output=True, text=True, timeout=120)
    text = done.stdout + done.stderr
    assert done.returncode == 0 and "fail" not in text.lower(), f"{volume}: {command}: {text}"


def test_set_rate_speeds_up_a_running_job_at_once(dev_cluster: DevCluster) -> None:
    # 256 blocks at 256 KiB/s would take 64 s; every block is in a worker's hands,
    # sleeping for its slot, when the rate changes.
    _volumes(dev_cluster, "s-src", "s-dst", size="16MiB")
    job_id = dev_cluster.json("refresh", "s-dst", "--from", "s-src", "--rate", "256KiB")["id"]
    time.sleep(1.0)
    changed = dev_cluster.json("job", "set-rate", job_id, "0")
    assert changed["rate_bytes_per_second"] == 0 and changed["state"] == "running"
    waited = dev_cluster.cli("job", "wait", job_id, "--timeout", "15", "-o", "json")
    assert waited.returncode == 0, waited.stderr
    slower = dev_cluster.cli("job", "set-rate", job_id, "1MiB")
    assert slower.returncode == 1 and "done" in one_error_line(slower)
    for name in ("s-dst", "s-src"):
        dev_cluster.ok("volume", "delete", name)


def test_job_wait_timeout_exits_4_with_one_line_and_the_job_goes_on(
        dev_cluster: DevCluster) -> None:
    _volumes(dev_cluster, "w-src", "w-dst", size="8MiB")
    job_id = dev_cluster.json("refresh", "w-dst", "--from", "w-src", "--rate", "128KiB")["id"]
    started = time.monotonic()
    waited = dev_cluster.cli("job", "wait", job_id, "--timeout", "1.5")
    # Progress lines on stderr, as any wait shows them; then the one line that says why.
    assert waited.returncode == 4 and "Traceback" not in waited.stderr
    assert waited.stderr.splitlines()[-1].startswith(
        f"volkin: job {job_id} is still running after 1.5 s")
    assert time.monotonic() - started < 10
    assert _job(dev_cluster, job_id)["state"] == "running"
    dev_cluster.ok("job", "set-rate", job_id, "0")
    assert dev_cluster.cli("job", "wait", job_id, "--timeout", "30").returncode == 0
    for name in ("w-dst", "w-src"):
        dev_cluster.ok("volume", "delete", name)


def test_cancel_stops_the_copy_and_the_target_keeps_reading_its_pit_copy_of_the_source(
        dev_cluster: DevCluster) -> None:
    size = 4 * MiB
    _volumes(dev_cluster, "c-src", "c-dst", size="4MiB")
    _qemu_io(dev_cluster, "c-src", f"write -P 0x11 0 {size}")
    _qemu_io(dev_cluster, "c-dst", f"write -P 0x22 0 {size}")
    dev_cluster.ok("snapshot", "create", "c-dst", "c-dst-old")
    job_id = dev_cluster.json("refresh", "c-dst", "--from", "c-src", "--rate", "256KiB")["id"]
    time.sleep(1.0)

    cancelled = dev_cluster.json("job", "cancel", job_id)
    assert cancelled["state"] == "cancelled" and cancelled["error"] == ""
    held = _held_still(dev_cluster, job_id)
    assert 0 < held < 64 and _job(dev_cluster, job_id)["state"] == "cancelled"
    target = dev_cluster.json("volume", "show", "c-dst")
    assert target["source"] == "c-src", "the blocks not copied still read through the source"

    # The target reads as the source did when the refresh started, copied or not; the
    # snapshot keeps the target's old contents; a later write to the source is not seen.
    _qemu_io(dev_cluster, "c-dst", f"read -P 0x11 0 {size}")
    _qemu_io(dev_cluster, "c-dst-old", f"read -P 0x22 0 {size}")
    _qemu_io(dev_cluster, "c-src", f"write -P 0x33 0 {size}")
    _qemu_io(dev_cluster, "c-dst", f"read -P 0x11 0 {size}")
    refused = dev_cluster.cli("volume", "delete", "c-src")
    assert refused.returncode == 1 and "c-dst" in one_error_line(refused)
    waited = dev_cluster.cli("job", "wait", job_id)
    assert waited.returncode == 1 and "was cancelled" in waited.stderr.splitlines()[-1]
    again = dev_cluster.cli("job", "cancel", job_id)
    assert again.returncode == 1 and "cancelled already" in one_error_line(again)

    # Resumed, it finishes from where it stopped (the writes to the source above
    # copied their blocks to the target first, Fig 8); then the source may go.
    dev_cluster.ok("job", "set-rate", job_id, "0")
    dev_cluster.ok("job", "resume", job_id)
    assert dev_cluster.cli("job", "wait", job_id, "--timeout", "30").returncode == 0
    _qemu_io(dev_cluster, "c-dst", f"read -P 0x11 0 {size}")
    for name in ("c-src", "c-dst-old", "c-dst"):
        dev_cluster.ok("volume", "delete", name)
