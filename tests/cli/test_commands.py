"""Every admin command end to end: the CLI process against a dev cluster of real processes."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from tests.cli.conftest import DevCluster, one_error_line
from volkin import nbdargs

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _volumes(cluster: DevCluster) -> list[dict[str, Any]]:
    found = cluster.json("volume", "list")
    assert isinstance(found, list)
    return found


def _job(cluster: DevCluster, job_id: str) -> dict[str, Any]:
    job = cluster.json("job", "show", job_id)
    assert isinstance(job, dict)
    return job


def test_volume_create_list_show_delete(dev_cluster: DevCluster) -> None:
    created = dev_cluster.json("volume", "create", "vol-a", "--size", "8MiB",
                               "--block-size", "64KiB")
    assert created == {"name": "vol-a", "kind": "primary", "size_bytes": 8 * MiB,
                       "block_size": 65536, "source": "", "valid_blocks": 128,
                       "total_blocks": 128, "agents": created["agents"],
                       "stripe_unit_bytes": MiB, "stripe_width": 2, "connections": 0,
                       "allocated_bytes": 0}
    assert sorted(created["agents"]) == ["agent1", "agent2"]  # striped over both
    assert dev_cluster.json("volume", "show", "vol-a") == created  # thin: nothing on disk
    assert created in _volumes(dev_cluster)
    shown = dev_cluster.ok("volume", "show", "vol-a").splitlines()
    assert shown[0].split()[6] == "ALLOCATED" and shown[1].split()[6] == "0B", shown
    assert shown[0].split()[7] == "STRIPES" and shown[1].split()[7] == "2x1MiB", shown

    table = dev_cluster.ok("volume", "list").splitlines()
    assert table[0].split()[:3] == ["NAME", "KIND", "SIZE"]
    assert any(line.split()[:4] == ["vol-a", "primary", "8MiB", "64KiB"] for line in table)

    default_block = dev_cluster.json("volume", "create", "vol-b", "--size", "1MiB")
    assert default_block["block_size"] == 65536, "the controller's default block size"

    assert dev_cluster.ok("volume", "delete", "vol-a") == ""
    assert dev_cluster.json("volume", "delete", "vol-b", "--force") == {"name": "vol-b",
                                                                        "deleted": True}
    names = {v["name"] for v in _volumes(dev_cluster)}
    assert not names & {"vol-a", "vol-b"}
    error = one_error_line(dev_cluster.cli("volume", "show", "vol-a"))
    assert "vol-a" in error and "NOT_FOUND" in error


def test_volume_resize_grows_a_volume_and_refuses_one_a_snapshot_reads_through(
        dev_cluster: DevCluster) -> None:
    dev_cluster.ok("volume", "create", "grow", "--size", "4MiB")
    grown = dev_cluster.json("volume", "resize", "grow", "--size", "12MiB")
    assert (grown["size_bytes"], grown["total_blocks"]) == (12 * MiB, 192)
    table = dev_cluster.ok("volume", "resize", "grow", "--size", "12MiB").splitlines()
    assert table[1].split()[:3] == ["grow", "primary", "12MiB"]  # the same size: a no-op
    dev_cluster.ok("snapshot", "create", "grow", "grow-s")
    error = one_error_line(dev_cluster.cli("volume", "resize", "grow", "--size", "16MiB"))
    assert "FAILED_PRECONDITION" in error and "materialize grow-s first" in error
    assert dev_cluster.json("volume", "show", "grow")["size_bytes"] == 12 * MiB
    dev_cluster.ok("volume", "delete", "grow-s")
    dev_cluster.ok("volume", "delete", "grow")


def test_bad_requests_fail_with_one_line_and_change_nothing(dev_cluster: DevCluster) -> None:
    dev_cluster.ok("volume", "create", "keep", "--size", "4MiB")
    before = _volumes(dev_cluster)
    jobs_before = dev_cluster.json("job", "list")
    cases = [
        (["volume", "create", "keep", "--size", "4MiB"], "ALREADY_EXISTS"),
        (["volume", "create", "odd", "--size", "100000"], "INVALID_ARGUMENT"),
        (["volume", "create", "big-block", "--size", "4MiB", "--block-size", "1000"],
         "block size 1000 must be a power of two"),
        (["volume", "create", "odd-size", "--size", "100KiB", "--block-size", "64KiB"],
         "must be a multiple of the block size 65536"),
        (["volume", "delete", "nope"], "NOT_FOUND"),
        (["snapshot", "create", "nope", "snap"], "NOT_FOUND"),
        (["snapshot", "create", "keep", "keep"], "ALREADY_EXISTS"),
        (["refresh", "keep", "--from", "nope"], "NOT_FOUND"),
        (["job", "show", "j999"], "NOT_FOUND"),
        (["job", "pause", "j999"], "NOT_FOUND"),
        (["job", "resume", "j999"], "NOT_FOUND"),
        (["job", "wait", "j999"], "NOT_FOUND"),
        (["volume", "create", "junk", "--size", "4 megs"], "unknown unit 'megs'"),
        (["volume", "resize", "keep", "--size", "2MiB"], "volumes only grow"),
        (["volume", "resize", "nope", "--size", "8MiB"], "NOT_FOUND"),
    ]
    for argv, said in cases:
        done = dev_cluster.cli(*argv)
        assert said in one_error_line(done), argv
        assert done.stdout == "", argv
    assert _volumes(dev_cluster) == before
    assert dev_cluster.json("job", "list") == jobs_before
    dev_cluster.ok("volume", "delete", "keep")


def test_snapshot_then_refresh_wait_reaches_done(dev_cluster: DevCluster) -> None:
    for name in ("src", "dst"):
        dev_cluster.ok("volume", "create", name, "--size", "4MiB")
    snap = dev_cluster.json("snapshot", "create", "dst", "dst-snap")
    assert (snap["name"], snap["kind"], snap["source"]) == ("dst-snap", "snapshot", "dst")

    done = dev_cluster.cli("refresh", "dst", "--from", "src", "--wait")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert job_id.startswith("j") and "\n" not in job_id, "stdout is the job id alone"
    progress = done.stderr.splitlines()
    assert progress and "\r" not in done.stderr, "plain lines when stderr is no terminal"
    assert progress[-1].startswith(f"{job_id} refresh dst <- src  done  64/64 blocks (100%)")

    job = _job(dev_cluster, job_id)
    assert (job["state"], job["kind"], job["target"], job["source"]) == ("done", "refresh",
                                                                         "dst", "src")
    assert job["blocks_done"] == job["blocks_total"] == 64
    assert job in dev_cluster.json("job", "list")
    assert any(line.split()[:3] == [job_id, "refresh", "done"]
               for line in dev_cluster.ok("job", "list").splitlines())
    assert dev_cluster.json("volume", "show", "dst")["source"] == ""

    waited = dev_cluster.cli("job", "wait", job_id, "-o", "json")
    assert waited.returncode == 0 and json.loads(waited.stdout)["state"] == "done"

    again = dev_cluster.json("refresh", "dst", "--from", "src", "--wait")
    assert again["state"] == "done" and again["id"] != job_id, "stdout is the final job alone"
    for name in ("dst-snap", "dst", "src"):
        dev_cluster.ok("volume", "delete", name)


def test_pause_holds_a_job_still_and_resume_lets_wait_finish(dev_cluster: DevCluster) -> None:
    for name in ("p-src", "p-dst"):
        dev_cluster.ok("volume", "create", name, "--size", "16MiB")
    # Data to copy: a copy's rate counts the data it moves, and holes move none.
    written = subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 16M",
                              *nbdargs.qemu(dev_cluster.env["VOLKIN_NBD"], "p-src",
                                            dev_cluster.env.get(nbdargs.ENV_TLS_DIR))],
                             capture_output=True, text=True, timeout=60, check=False)
    assert written.returncode == 0, written.stdout + written.stderr
    started = dev_cluster.json("refresh", "p-dst", "--from", "p-src", "--rate", "4MiB")
    assert started["state"] == "running" and started["rate_bytes_per_second"] == 4 * MiB
    job_id = started["id"]

    paused = dev_cluster.json("job", "pause", job_id)
    assert paused["state"] == "paused"
    # Copies already in flight (a batch may wait for the rate limit) may land after
    # the pause; then nothing moves.
    held, since, deadline = -1, time.monotonic(), time.monotonic() + 15
    while time.monotonic() - since < 1.5 and time.monotonic() < deadline:
        time.sleep(0.25)
        now = _job(dev_cluster, job_id)["blocks_done"]
        if now != held:
            held, since = now, time.monotonic()
    time.sleep(1.0)
    still = _job(dev_cluster, job_id)
    assert still["state"] == "paused" and still["blocks_done"] == held < 256

    resumed = dev_cluster.json("job", "resume", job_id)
    assert resumed["state"] == "running"
    waited = dev_cluster.cli("job", "wait", job_id)
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.splitlines()[1].split()[:3] == [job_id, "refresh", "done"]
    assert "256/256 blocks (100%)" in waited.stderr.splitlines()[-1]
    for name in ("p-dst", "p-src"):
        dev_cluster.ok("volume", "delete", name)


@pytest.mark.slow
def test_the_demo_refreshes_over_nbd_and_says_pass(dev_cluster: DevCluster) -> None:
    done = dev_cluster.cli("dev", "demo", "--dir", str(dev_cluster.dir), "--size", "4MiB",
                           "--rate", "2MiB")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict: PASS" in done.stdout
    assert done.stdout.count("   ok  ") == 9 and "FAIL" not in done.stdout
    again = dev_cluster.cli("dev", "demo", "--dir", str(dev_cluster.dir), "--size", "4MiB",
                            "--rate", "8MiB")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "left by an earlier demo" in again.stdout and "verdict: PASS" in again.stdout


def test_snapshot_materialize_wait_makes_it_real_so_its_origin_can_go(
        dev_cluster: DevCluster) -> None:
    dev_cluster.ok("volume", "create", "orig", "--size", "2MiB")
    dev_cluster.ok("snapshot", "create", "orig", "orig-snap")
    refused = dev_cluster.cli("volume", "delete", "orig")
    assert refused.returncode == 1 and "orig-snap" in one_error_line(refused)

    done = dev_cluster.cli("snapshot", "materialize", "orig-snap", "--wait")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert done.stderr.splitlines()[-1].startswith(
        f"{job_id} materialize orig-snap <- orig  done  32/32 blocks (100%)")
    assert dev_cluster.json("volume", "show", "orig-snap")["source"] == ""
    again = dev_cluster.cli("snapshot", "materialize", "orig-snap")
    assert again.returncode == 1 and "already real" in one_error_line(again)
    dev_cluster.ok("volume", "delete", "orig")
    dev_cluster.ok("volume", "delete", "orig-snap")
