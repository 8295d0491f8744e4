"""The operator's shell against a real volkin cluster (etcd, two agents, a controller as
processes); Kubernetes is a fake that holds PVCs, PVs and the resource's status, since
no API server runs here. What is proven: a decision to start runs a real refresh, the
status follows the real job to Succeeded, and a repeated or interrupted start never
starts a second refresh."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.agent.conftest import AgentFactory, start_agent
from tests.controller.conftest import ControllerFactory, etcd_server, start_controller
from tests.controller.test_daemon import qemu_io
from tests.support import libnbd
from tests.support.tls import libnbd_tls, nbd_tls_dir
from volkin.api.v1 import admin_pb2
from volkin.k8s import CSI_DRIVER
from volkin.k8s.decision import Phase, Resolution, Status, Unresolved
from volkin.k8s.kube import pvc_handle
from volkin.k8s.reconcile import reconcile
from volkin.k8s.resource import status_from
from volkin.k8s.volkin_state import VolkinAdmin

__all__ = ["etcd_server", "start_agent", "start_controller"]
pytestmark = pytest.mark.integration
MiB = 1 << 20


class FakeKube:
    """PVCs bound to volkin PVs, and the VolumeRefresh's status as last written."""

    def __init__(self, volumes: dict[str, str]) -> None:
        self.pvcs = {pvc: {"spec": {"volumeName": f"pv-{pvc}"}, "status": {"phase": "Bound"}}
                     for pvc in volumes}
        self.pvs = {f"pv-{pvc}": {"spec": {"csi": {"driver": CSI_DRIVER, "volumeHandle": h}}}
                    for pvc, h in volumes.items()}
        self.status: dict[str, Any] | None = None
        self.writes: list[dict[str, Any]] = []
        self.fail_writes_after: int | None = None

    def resolve_pvc(self, namespace: str, name: str) -> Resolution:
        pvc = self.pvcs.get(name)
        return pvc_handle(name, pvc, self.pvs.get(pvc["spec"]["volumeName"]) if pvc else None)

    def resolve_snapshot(self, namespace: str, name: str) -> Resolution:
        return Unresolved("no snapshots in this fake")

    def write_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        if self.fail_writes_after is not None and len(self.writes) >= self.fail_writes_after:
            raise ConnectionError("API server went away")
        self.writes.append(status)
        self.status = {k: v for k, v in status.items() if v is not None}


SPEC = {"targetPVC": "staging", "source": {"persistentVolumeClaimName": "prod"}}


def cluster(start_agent: AgentFactory, start_controller: ControllerFactory,
            size: int = 4 * MiB) -> tuple[str, str, VolkinAdmin]:
    start_agent("a1"), start_agent("a2")
    c = start_controller("c1")
    for name, pattern in (("vol-prod", "0x11"), ("vol-staging", "0x22")):
        c.stub.CreateVolume(admin_pb2.CreateVolumeRequest(name=name, size_bytes=size))
        qemu_io(c.nbd, name, f"write -P {pattern} 0 {size}")
    return c.admin, c.nbd, VolkinAdmin(c.admin)


def until_final(kube: FakeKube, admin: VolkinAdmin, spec: dict[str, Any] = SPEC,
                timeout: float = 60.0) -> list[Status]:
    seen: list[Status] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = reconcile("ns", "refresh-staging", spec, kube.status, kube, admin)
        seen.append(now)
        if now.phase in (Phase.SUCCEEDED, Phase.FAILED):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"never finished: {seen[-1]}")


def test_a_started_refresh_is_a_real_job_and_the_status_follows_it_to_succeeded(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    _, nbd, admin = cluster(start_agent, start_controller)
    kube = FakeKube({"prod": "vol-prod", "staging": "vol-staging"})
    spec = {**SPEC, "rateBytesPerSecond": 2 * MiB}  # about two seconds: Running is seen
    seen = until_final(kube, admin, spec)

    final = seen[-1]
    assert final.phase is Phase.SUCCEEDED, final
    assert Phase.RUNNING in [s.phase for s in seen]
    jobs = [j for j in admin.cluster().jobs.values() if j.target == "vol-staging"]
    assert [(j.id, j.source, j.state) for j in jobs] == [(final.job_id, "vol-prod", "done")]
    assert (final.blocks_done, final.blocks_total, final.percent) == (64, 64, 100)
    assert status_from(kube.status) == final  # what Kubernetes holds is what was decided
    qemu_io(nbd, "vol-staging", f"read -P 0x11 0 {4 * MiB}")

    writes = len(kube.writes)
    reconcile("ns", "refresh-staging", spec, kube.status, kube, admin)
    assert len(kube.writes) == writes  # a finished resource: nothing more is written


def test_an_operator_that_dies_after_starting_adopts_its_job_rather_than_start_another(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    _, _, admin = cluster(start_agent, start_controller)
    kube = FakeKube({"prod": "vol-prod", "staging": "vol-staging"})
    kube.fail_writes_after = 1  # the marker is written, the job id is not
    with pytest.raises(ConnectionError):
        reconcile("ns", "refresh-staging", SPEC, kube.status, kube, admin)
    assert kube.status is not None and "jobID" not in kube.status
    started = [j for j in admin.cluster().jobs.values() if j.target == "vol-staging"]
    assert len(started) == 1

    kube.fail_writes_after = None
    final = until_final(kube, admin)[-1]
    assert final.phase is Phase.SUCCEEDED and final.job_id == started[0].id
    assert [j.id for j in admin.cluster().jobs.values() if j.target == "vol-staging"] == [
        started[0].id]


def test_a_target_with_an_nbd_client_waits_and_starts_once_the_client_is_gone(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    _, nbd_address, admin = cluster(start_agent, start_controller)
    kube = FakeKube({"prod": "vol-prod", "staging": "vol-staging"})
    nbd = libnbd.load()
    client = nbd.NBD()
    libnbd_tls(client, nbd)
    client.connect_uri(f"{'nbds' if nbd_tls_dir() else 'nbd'}://{nbd_address}/vol-staging")
    try:
        status = reconcile("ns", "refresh-staging", SPEC, kube.status, kube, admin)
        assert status.phase is Phase.WAITING and "in use" in status.message
        assert not [j for j in admin.cluster().jobs.values() if j.target == "vol-staging"]
    finally:
        client.shutdown()
    deadline = time.monotonic() + 10
    while admin.cluster().volumes["vol-staging"].connections and time.monotonic() < deadline:
        time.sleep(0.1)
    assert until_final(kube, admin)[-1].phase is Phase.SUCCEEDED


def test_a_standby_controller_leaves_the_resource_as_it_was(
        start_agent: AgentFactory, start_controller: ControllerFactory) -> None:
    import grpc

    start_agent("a1")
    start_controller("c1")
    standby = start_controller("c2", standby=True)
    address = _listening(standby.log())
    kube = FakeKube({"prod": "vol-prod", "staging": "vol-staging"})
    with pytest.raises(grpc.RpcError) as caught:
        reconcile("ns", "refresh-staging", SPEC, kube.status, kube, VolkinAdmin(address))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert kube.writes == []


def _listening(log: str) -> str:
    import re

    found = re.search(r"event=controller\.listening .*admin=(\S+)", log)
    assert found, log
    return found.group(1)

