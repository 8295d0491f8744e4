"""The admin API's audit log and its cluster status, on real controller, agent and etcd
processes."""

from __future__ import annotations

import asyncio
import re
import shlex

import grpc
import pytest

from controller.service import MUTATIONS, READS
from tests.agent.conftest import AgentFactory
from tests.controller.conftest import Controller, ControllerFactory
from tests.support import tls
from volkin import errors
from volkin.api.v1 import admin_pb2
from volkin.csi.admin import Admin

pytestmark = pytest.mark.integration
MiB = 1 << 20


def _audit_lines(controller: Controller) -> list[dict[str, str]]:
    lines = []
    for line in controller.log().splitlines():
        pairs = dict(pair.split("=", 1) for pair in shlex.split(line) if "=" in pair)
        if pairs.get("event", "").startswith("audit."):
            lines.append(pairs)
    return lines


def test_every_admin_rpc_is_either_an_audited_mutation_or_a_read() -> None:
    rpcs = set(admin_pb2.DESCRIPTOR.services_by_name["Admin"].methods_by_name)
    assert rpcs == MUTATIONS | READS and not MUTATIONS & READS


def test_every_admin_mutation_logs_one_audit_line_with_who_what_and_result(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    c = start_controller("c1")
    stub = c.stub
    stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="v1", size_bytes=4 * MiB), timeout=30)
    stub.CreateVolume(admin_pb2.CreateVolumeRequest(name="v2", size_bytes=4 * MiB), timeout=30)
    stub.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source="v2", name="s2"), timeout=30)
    job = stub.StartRefresh(admin_pb2.StartRefreshRequest(
        target="v2", source="v1", rate_bytes_per_second=64 << 10), timeout=30)
    stub.SetJobRate(admin_pb2.SetJobRateRequest(id=job.id, rate_bytes_per_second=128 << 10),
                    timeout=30)
    stub.PauseJob(admin_pb2.PauseJobRequest(id=job.id), timeout=30)
    stub.ResumeJob(admin_pb2.ResumeJobRequest(id=job.id), timeout=30)
    stub.CancelJob(admin_pb2.CancelJobRequest(id=job.id), timeout=30)
    # The cancelled refresh left v2 reading through v1: materializing it continues.
    materialize = stub.StartMaterialize(admin_pb2.StartMaterializeRequest(
        name="v2", rate_bytes_per_second=64 << 10), timeout=30)
    stub.CancelJob(admin_pb2.CancelJobRequest(id=materialize.id), timeout=30)
    with pytest.raises(grpc.RpcError) as refused:
        stub.DeleteVolume(admin_pb2.DeleteVolumeRequest(name="nope"), timeout=30)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    stub.DeleteVolume(admin_pb2.DeleteVolumeRequest(name="s2"), timeout=30)
    stub.GetVolume(admin_pb2.GetVolumeRequest(name="v1"), timeout=30)  # a read: not audited

    lines = _audit_lines(c)
    assert [line["event"] for line in lines] == [
        "audit.create_volume", "audit.create_volume", "audit.create_snapshot",
        "audit.start_refresh", "audit.set_job_rate", "audit.pause_job", "audit.resume_job",
        "audit.cancel_job", "audit.start_materialize", "audit.cancel_job",
        "audit.delete_volume", "audit.delete_volume"]
    # Who: the client certificate's name with TLS (the suite's is `node`), else the address.
    expected_who = "node" if tls.enabled() else "ipv4:127.0.0.1:"
    assert all(line["who"].startswith(expected_who) for line in lines)
    assert lines[0]["volume"] == "v1" and lines[0]["size"] == str(4 * MiB)
    assert (lines[3]["target"], lines[3]["source"], lines[3]["rate"]) == ("v2", "v1", "65536")
    assert (lines[4]["job"], lines[4]["rate"]) == (job.id, "131072")
    assert all(line["result"] == "ok" for line in lines if line.get("volume") != "nope")
    failed = next(line for line in lines if line.get("volume") == "nope")
    assert failed["result"] == "NOT_FOUND" and "nope" in failed["error"]


def test_a_standby_answers_the_cluster_status_and_names_the_leader(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    leader = start_controller("c1")
    standby = start_controller("c2", standby=True)
    listening = re.search(r"event=controller\.listening .*admin=(\S+)", standby.log())
    assert listening is not None
    standby.admin = listening.group(1)
    status = standby.stub.GetClusterStatus(admin_pb2.GetClusterStatusRequest(), timeout=30)
    assert status.healthy, list(status.problems)
    assert (status.controller.leader, status.controller.answered_by) == ("c1", "c2")
    assert not status.controller.answered_by_leader
    assert status.controller.leader_admin_address == leader.admin
    assert [(a.node_id, a.alive) for a in status.agents] == [("a1", True)]
    assert status.etcd.healthy and status.etcd.db_size_bytes > 0


def test_a_refusal_of_the_admin_api_reaches_a_client_as_failed_precondition_not_fencing(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    start_agent("a1")
    c = start_controller("c1")

    async def materialize_a_real_volume() -> errors.VolkinError:
        admin = Admin(c.admin)
        try:
            await admin.create_volume("real", 4 * MiB, 65536)
            with pytest.raises(errors.VolkinError) as refused:
                await admin.start_materialize("real")
            return refused.value
        finally:
            await admin.close()

    error = asyncio.run(materialize_a_real_volume())
    assert type(error) is errors.FailedPrecondition
    assert "already real" in error.message and "FAILED_PRECONDITION" not in error.message
