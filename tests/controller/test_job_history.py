"""Jobs that are over do not pile up in etcd: the newest `job_history` of them are kept,
older ones deleted; a refresh superseded by a newer one of its target ends cancelled, and
cannot be resumed."""

from __future__ import annotations

import asyncio
import subprocess

import grpc
import pytest

from tests.agent.conftest import AgentFactory
from tests.controller.conftest import Controller, ControllerFactory
from tests.support.etcd import EtcdServer
from tests.support.tls import qemu_nbd
from volkin import etcd
from volkin.api.v1 import admin_pb2

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _create(c: Controller, *names: str) -> None:
    for name in names:
        c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=MiB),
                            timeout=30)


def _fill(c: Controller, name: str) -> None:
    """Data to copy: a refresh from an empty source has nothing to do."""
    done = subprocess.run(["qemu-io", "-c", "write -P 0x5a 0 1M", *qemu_nbd(c.nbd, name)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _refresh_to_the_end(c: Controller, target: str, source: str) -> str:
    job = c.stub.StartRefresh(admin_pb2.StartRefreshRequest(target=target, source=source),
                              timeout=30)
    updates = list(c.stub.WatchJob(admin_pb2.GetJobRequest(id=job.id), timeout=60))
    last = updates[-1] if updates else job
    assert last.state == admin_pb2.JOB_STATE_DONE, last
    return str(job.id)


def _listed(c: Controller) -> list[str]:
    return [j.id for j in c.stub.ListJobs(admin_pb2.ListJobsRequest(), timeout=30).jobs]


def _stored(server: EtcdServer) -> list[str]:
    async def read() -> list[str]:
        client = await etcd.connect([server.endpoint])
        try:
            keys = await client.get_prefix("/volkin/jobs/")
        finally:
            await client.close()
        return sorted((k.rpartition("/")[2] for k in keys if "/jobs/j" in k),
                      key=lambda i: int(i[1:]))
    return asyncio.run(read())


def test_only_the_newest_jobs_that_are_over_are_kept_and_a_failed_one_stays(
        start_agent: AgentFactory, start_controller: ControllerFactory,
        etcd_server: EtcdServer) -> None:
    start_agent("a1")
    c1 = start_controller("c1", "--job-history", "3")
    _create(c1, "src", "t1", "t2", "t3", "t4", "t5", "slow", "gone")
    _fill(c1, "src")
    # A failed job whose target exists is work left to do: never forgotten. (Its source
    # must hold data: a refresh of an empty source has nothing to copy.)
    failing = c1.stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="slow", source="src", rate_bytes_per_second=1), timeout=30)
    c1.stub.PauseJob(admin_pb2.PauseJobRequest(id=failing.id), timeout=30)
    done = [_refresh_to_the_end(c1, f"t{i}", "src") for i in range(1, 6)]
    listed = _listed(c1)
    assert failing.id in listed, "a paused job is not over"
    assert [j for j in listed if j != failing.id] == done[-3:]
    assert _stored(etcd_server) == sorted([failing.id, *done[-3:]], key=lambda i: int(i[1:]))
    assert "event=job.forgotten" in c1.log()

    # A job whose target was deleted is over: it counts among the kept, then goes.
    gone = c1.stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="gone", source="src", rate_bytes_per_second=1), timeout=30)
    c1.stub.DeleteVolume(admin_pb2.DeleteVolumeRequest(name="gone"), timeout=30)
    assert c1.stub.GetJob(admin_pb2.GetJobRequest(id=gone.id),
                          timeout=30).state == admin_pb2.JOB_STATE_FAILED
    assert gone.id in _listed(c1) and done[2] not in _listed(c1)

    # A new controller with a shorter history forgets down to it as it loads the jobs.
    c1.stop()
    c2 = start_controller("c2", "--job-history", "1")
    assert _listed(c2) == [failing.id, gone.id]
    assert _stored(etcd_server) == [failing.id, gone.id]


def test_a_superseded_refresh_ends_cancelled_naming_the_newer_one_and_cannot_be_resumed(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    c = start_controller("c1")
    _create(c, "one", "two", "target")
    _fill(c, "one")
    older = c.stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="target", source="one", rate_bytes_per_second=1), timeout=30)
    newer = c.stub.StartRefresh(admin_pb2.StartRefreshRequest(target="target", source="two"),
                                timeout=30)
    ended = c.stub.GetJob(admin_pb2.GetJobRequest(id=older.id), timeout=30)
    assert ended.state == admin_pb2.JOB_STATE_CANCELLED
    assert ended.error == f"superseded by refresh {newer.id} (from two)"
    with pytest.raises(grpc.RpcError) as refused:
        c.stub.ResumeJob(admin_pb2.ResumeJobRequest(id=older.id), timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "superseded" in (refused.value.details() or "")
    assert c.stub.GetVolume(admin_pb2.GetVolumeRequest(name="target"),
                            timeout=30).source in ("two", "")
