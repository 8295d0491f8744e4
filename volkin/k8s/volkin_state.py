"""volkin's side of the operator: the admin API read into a `Cluster`, and StartRefresh."""

from __future__ import annotations

import volkin.tls
from volkin.api.v1 import admin_pb2, admin_pb2_grpc
from volkin.k8s.decision import Cluster, Job, Start, Volume

_STATE = {admin_pb2.JOB_STATE_RUNNING: "running", admin_pb2.JOB_STATE_PAUSED: "paused",
          admin_pb2.JOB_STATE_WAITING: "waiting", admin_pb2.JOB_STATE_DONE: "done",
          admin_pb2.JOB_STATE_FAILED: "failed", admin_pb2.JOB_STATE_CANCELLED: "cancelled"}
_KIND = {admin_pb2.JOB_KIND_REFRESH: "refresh", admin_pb2.JOB_KIND_MATERIALIZE: "materialize"}


def job_from(job: admin_pb2.Job) -> Job:
    return Job(id=job.id, kind=_KIND.get(job.kind, "unknown"),
               state=_STATE.get(job.state, "unknown"), target=job.target, source=job.source,
               blocks_total=job.blocks_total, blocks_done=job.blocks_done, error=job.error,
               reason=job.reason)


def volume_from(volume: admin_pb2.Volume) -> Volume:
    return Volume(name=volume.name, size_bytes=volume.size_bytes,
                  block_size=volume.block_size, connections=volume.connections)


class VolkinAdmin:
    """The two admin calls the operator makes, on one channel to the active controller."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        self._channel = volkin.tls.channel(address)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]
        self._timeout = timeout

    def cluster(self) -> Cluster:
        """Every volume and job, as the active controller knows them now."""
        volumes = self._stub.ListVolumes(admin_pb2.ListVolumesRequest(), timeout=self._timeout)
        jobs = self._stub.ListJobs(admin_pb2.ListJobsRequest(), timeout=self._timeout)
        return Cluster(volumes={v.name: volume_from(v) for v in volumes.volumes},
                       jobs={j.id: job_from(j) for j in jobs.jobs})

    def start(self, start: Start) -> Job:
        """Starts the refresh; raises grpc.RpcError as the controller answered."""
        job = self._stub.StartRefresh(
            admin_pb2.StartRefreshRequest(target=start.target, source=start.source,
                                          rate_bytes_per_second=start.rate),
            timeout=self._timeout)
        return job_from(job)

    def close(self) -> None:
        self._channel.close()
