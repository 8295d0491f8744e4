"""`volkin-controller` as a real process: admin API, NBD, jobs, restarts and a standby."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import grpc
import pytest

from tests.agent.conftest import AgentFactory
from tests.controller.conftest import Controller, ControllerFactory
from tests.support.tls import qemu_nbd
from volkin.api.v1 import admin_pb2

pytestmark = pytest.mark.integration

MiB = 1 << 20


def qemu_io(nbd: str, volume: str, *commands: str) -> str:
    argv = ["qemu-io"]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, *qemu_nbd(nbd, volume)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0 and "verification failed" not in result.stdout, (
        result.stdout + result.stderr)
    return result.stdout


def wait_job(controller: Controller, job_id: str) -> admin_pb2.Job:
    last: admin_pb2.Job | None = None
    for job in controller.stub.WatchJob(admin_pb2.GetJobRequest(id=job_id), timeout=120):
        assert isinstance(job, admin_pb2.Job)
        last = job
    assert last is not None
    return last


def status_of(call: Callable[[], object]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code = caught.value.code()
    assert isinstance(code, grpc.StatusCode)
    return code


def test_volumes_snapshots_and_a_refresh_through_the_admin_api_and_nbd(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1"), start_agent("a2")
    c = start_controller("c1")
    admin = c.stub
    for name in ("V1", "V2"):
        volume = admin.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=8 * MiB))
        assert (volume.size_bytes, volume.block_size, volume.total_blocks) == (8 * MiB, 65536, 128)
    qemu_io(c.nbd, "V1", "write -P 0x01 0 8M")
    qemu_io(c.nbd, "V2", "write -P 0x02 0 8M")
    snapshot = admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V2", name="S2"))
    assert snapshot.kind == admin_pb2.VOLUME_KIND_SNAPSHOT and snapshot.source == "V2"

    job = admin.StartRefresh(admin_pb2.StartRefreshRequest(target="V2", source="V1"))
    assert job.blocks_total == 128 and job.state in (admin_pb2.JOB_STATE_RUNNING,
                                                     admin_pb2.JOB_STATE_DONE)
    qemu_io(c.nbd, "V2", "read -P 0x01 0 8M")  # at once
    qemu_io(c.nbd, "S2", "read -P 0x02 0 8M")
    done = wait_job(c, job.id)
    assert done.state == admin_pb2.JOB_STATE_DONE and done.blocks_done == 128
    assert admin.GetVolume(admin_pb2.GetVolumeRequest(name="V2")).source == ""
    names = {v.name for v in admin.ListVolumes(admin_pb2.ListVolumesRequest()).volumes}
    assert names == {"V1", "V2", "S2"}

    # Bad requests: a status with a message, and nothing changes.
    assert status_of(lambda: admin.CreateVolume(admin_pb2.CreateVolumeRequest(
        name="V1", size_bytes=MiB))) == grpc.StatusCode.ALREADY_EXISTS
    assert status_of(lambda: admin.CreateVolume(admin_pb2.CreateVolumeRequest(
        name="odd", size_bytes=MiB + 1))) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(lambda: admin.GetVolume(admin_pb2.GetVolumeRequest(
        name="nope"))) == grpc.StatusCode.NOT_FOUND
    assert status_of(lambda: admin.DeleteVolume(admin_pb2.DeleteVolumeRequest(
        name="V2"))) == grpc.StatusCode.FAILED_PRECONDITION  # S2 reads V2's old blocks
    assert status_of(lambda: admin.PauseJob(admin_pb2.PauseJobRequest(
        id=job.id))) == grpc.StatusCode.FAILED_PRECONDITION  # done already
    assert {v.name for v in admin.ListVolumes(admin_pb2.ListVolumesRequest()).volumes} == names
    qemu_io(c.nbd, "V2", "read -P 0x01 0 8M")
    qemu_io(c.nbd, "S2", "read -P 0x02 0 8M")


def test_a_paused_job_survives_a_controller_kill_and_finishes_after_restart(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1"), start_agent("a2")
    c = start_controller("c1")
    admin = c.stub
    for name in ("V1", "V2"):
        admin.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=16 * MiB,
                                                         block_size=65536))
    qemu_io(c.nbd, "V1", "write -P 0x0a 0 16M")
    qemu_io(c.nbd, "V2", "write -P 0x0b 0 16M")
    admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V2", name="S2"))
    # Slow enough to catch in the middle: 1 MiB/s over 16 MiB.
    job = admin.StartRefresh(admin_pb2.StartRefreshRequest(
        target="V2", source="V1", rate_bytes_per_second=MiB))
    time.sleep(1.5)
    paused = admin.PauseJob(admin_pb2.PauseJobRequest(id=job.id))
    assert paused.state == admin_pb2.JOB_STATE_PAUSED
    assert 0 < paused.blocks_done < paused.blocks_total
    qemu_io(c.nbd, "V2", "write -P 0x0c 15M 1M")  # writes go on while paused

    c.kill()  # kill -9: no shutdown
    c.start()
    admin = c.stub
    again = admin.GetJob(admin_pb2.GetJobRequest(id=job.id))
    assert again.state == admin_pb2.JOB_STATE_PAUSED
    assert again.blocks_done >= paused.blocks_done
    qemu_io(c.nbd, "V2", "read -P 0x0a 0 15M", "read -P 0x0c 15M 1M")
    qemu_io(c.nbd, "S2", "read -P 0x0b 0 16M")
    admin.ResumeJob(admin_pb2.ResumeJobRequest(id=job.id))
    done = wait_job(c, job.id)
    assert done.state == admin_pb2.JOB_STATE_DONE
    qemu_io(c.nbd, "V2", "read -P 0x0a 0 15M", "read -P 0x0c 15M 1M")
    qemu_io(c.nbd, "S2", "read -P 0x0b 0 16M")


def test_a_standby_controller_takes_over_when_the_active_one_dies(
        start_agent: AgentFactory, start_controller: ControllerFactory,
        tmp_path: object) -> None:
    start_agent("a1")
    first = start_controller("c1")
    first.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="V", size_bytes=MiB))
    qemu_io(first.nbd, "V", "write -P 0x5a 0 1M")
    second = Controller("c2", first.log_path.parent, first.etcd)
    second.spawn()
    deadline = time.monotonic() + 20
    while "controller.standby" not in second.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "controller.standby" in second.log() and "controller.serving" not in second.log()
    first.kill()
    try:
        second.wait_serving(timeout=30)  # after the 2 s lease of c1 expires
        assert "epoch=2" in second.log()
        qemu_io(second.nbd, "V", "read -P 0x5a 0 1M", "write -P 0x5b 0 4k")
        qemu_io(second.nbd, "V", "read -P 0x5b 0 4k")
    finally:
        second.kill()


def test_sigterm_stops_the_controller_cleanly(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    c = start_controller("c1")
    assert c.stop() == 0
    assert "controller.stopped" in c.log()


def test_kill_9_in_the_middle_of_a_running_copy_loses_nothing(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1"), start_agent("a2")
    c = start_controller("c1")
    admin = c.stub
    for name in ("V1", "V2"):
        admin.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=16 * MiB))
    qemu_io(c.nbd, "V1", "write -P 0x31 0 16M")
    qemu_io(c.nbd, "V2", "write -P 0x32 0 16M")
    admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V2", name="S2"))
    job = admin.StartRefresh(admin_pb2.StartRefreshRequest(
        target="V2", source="V1", rate_bytes_per_second=4 * MiB))
    qemu_io(c.nbd, "V1", "write -P 0x41 8M 1M")  # acknowledged during the copy
    qemu_io(c.nbd, "S2", "write -P 0x42 9M 1M")
    time.sleep(1.0)
    running = admin.GetJob(admin_pb2.GetJobRequest(id=job.id))
    assert running.state == admin_pb2.JOB_STATE_RUNNING
    assert 0 < running.blocks_done < running.blocks_total
    c.kill()  # plans cut anywhere: between a copy and its commit, mid group commit, ...
    c.start()
    done = wait_job(c, job.id)
    assert done.state == admin_pb2.JOB_STATE_DONE
    qemu_io(c.nbd, "V1", "read -P 0x31 0 8M", "read -P 0x41 8M 1M", "read -P 0x31 9M 7M")
    qemu_io(c.nbd, "V2", "read -P 0x31 0 16M")  # V1 as it was when the refresh started
    qemu_io(c.nbd, "S2", "read -P 0x32 0 9M", "read -P 0x42 9M 1M", "read -P 0x32 10M 6M")


def test_materializing_a_snapshot_makes_it_real_and_frees_its_origin(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1"), start_agent("a2")
    c = start_controller("c1")
    admin = c.stub
    admin.CreateVolume(admin_pb2.CreateVolumeRequest(name="V", size_bytes=4 * MiB))
    qemu_io(c.nbd, "V", "write -P 0x61 0 4M")
    admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="V", name="S"))
    qemu_io(c.nbd, "V", "write -P 0x62 0 1M")  # copy-on-write: S keeps 0x61 there
    assert status_of(lambda: admin.DeleteVolume(admin_pb2.DeleteVolumeRequest(
        name="V"))) == grpc.StatusCode.FAILED_PRECONDITION  # S still reads through V

    job = admin.StartMaterialize(admin_pb2.StartMaterializeRequest(name="S"))
    assert job.kind == admin_pb2.JOB_KIND_MATERIALIZE and job.blocks_total == 48
    done = wait_job(c, job.id)
    assert done.state == admin_pb2.JOB_STATE_DONE and done.blocks_done == 48
    snapshot = admin.GetVolume(admin_pb2.GetVolumeRequest(name="S"))
    assert snapshot.source == "" and snapshot.valid_blocks == snapshot.total_blocks == 64
    assert status_of(lambda: admin.StartMaterialize(admin_pb2.StartMaterializeRequest(
        name="S"))) == grpc.StatusCode.FAILED_PRECONDITION  # already real

    admin.DeleteVolume(admin_pb2.DeleteVolumeRequest(name="V"))
    assert [v.name for v in admin.ListVolumes(admin_pb2.ListVolumesRequest()).volumes] == ["S"]
    qemu_io(c.nbd, "S", "read -P 0x61 0 4M")


def test_deleting_the_target_of_a_paused_job_ends_it_and_resuming_says_why(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1"), start_agent("a2")
    c = start_controller("c1")
    for name in ("V1", "V2"):
        c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=8 * MiB))
    job = c.stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="V2", source="V1", rate_bytes_per_second=64 * 1024))
    c.stub.PauseJob(admin_pb2.PauseJobRequest(id=job.id))
    c.stub.DeleteVolume(admin_pb2.DeleteVolumeRequest(name="V2"))
    ended = c.stub.GetJob(admin_pb2.GetJobRequest(id=job.id))
    assert ended.state == admin_pb2.JOB_STATE_FAILED
    assert "target V2 was deleted" in ended.error
    with pytest.raises(grpc.RpcError) as caught:
        c.stub.ResumeJob(admin_pb2.ResumeJobRequest(id=job.id))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Traceback" not in c.log()
