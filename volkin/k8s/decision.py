"""What a VolumeRefresh needs next: a pure function of the resource and volkin's state.

`decide(spec, status, handles, cluster)` reads nothing and calls nothing; the operator
(`volkin.k8s.operator`) gathers its inputs from the Kubernetes API and the admin API,
and carries out what it returns:

- `Report(status)`: write this status if it differs from the stored one (nothing to do
  when it does not: deciding again on unchanged inputs gives the same status).
- `Start(target, source, rate, status)`: first store `status` (phase Pending, with
  `started_after` = the highest job number the controller knew), *then* call
  StartRefresh, then record its job id. The order makes a start safe to repeat: if the
  operator dies or loses a status write after StartRefresh, the next decision finds the
  job it started by its target, source and a number above `started_after`, and adopts
  it instead of starting a second refresh (which would supersede the first).

A refresh is refused while the target volume has NBD connections: a pod that mounts
the target would see its file system change under it. The decision waits (phase
Waiting) until the pod is gone. Once started, the copy runs online.

Succeeded and Failed are final: the operator stops looking. To refresh again, delete
the resource and create it anew; the next refresh of the same pair copies only the
blocks modified on either side since the last one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    WAITING = "Waiting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


FINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})


@dataclass(frozen=True)
class Spec:
    """The resource's spec: refresh `target_pvc` from `source_pvc` or `source_snapshot`."""

    target_pvc: str
    source_pvc: str = ""
    source_snapshot: str = ""
    rate: int = 0  # bytes per second, 0: unlimited

    @property
    def source_description(self) -> str:
        if self.source_pvc:
            return f"PVC {self.source_pvc}"
        return f"VolumeSnapshot {self.source_snapshot}"


@dataclass(frozen=True)
class Status:
    """The resource's status. `started_after` is the start marker (see the module)."""

    phase: Phase | None = None
    job_id: str = ""
    started_after: int | None = None
    blocks_done: int = 0
    blocks_total: int = 0
    message: str = ""
    target_volume: str = ""
    source_volume: str = ""

    @property
    def percent(self) -> int:
        if self.blocks_total == 0:
            return 100 if self.phase is Phase.SUCCEEDED else 0
        return self.blocks_done * 100 // self.blocks_total


@dataclass(frozen=True)
class Handle:
    """A PVC or VolumeSnapshot resolved to a volkin volume name (the CSI handle)."""

    volume: str


@dataclass(frozen=True)
class Unresolved:
    """Why a PVC or VolumeSnapshot names no volkin volume yet. `final`: it never will
    (another driver's volume); else it may (not bound yet, snapshot not ready)."""

    reason: str
    final: bool = False


Resolution = Handle | Unresolved


@dataclass(frozen=True)
class Volume:
    name: str
    size_bytes: int
    block_size: int
    connections: int = 0


@dataclass(frozen=True)
class Job:
    """A background copy job as the admin API reports it. `state` is one of running,
    paused, waiting, done, failed, cancelled."""

    id: str
    kind: str  # refresh or materialize
    state: str
    target: str
    source: str
    blocks_total: int = 0
    blocks_done: int = 0
    error: str = ""
    reason: str = ""

    @property
    def number(self) -> int:
        """Job ids are `j<N>` with N increasing (volkin.keys jobs_next)."""
        digits = self.id[1:]
        return int(digits) if digits.isdigit() else 0

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused", "waiting")


@dataclass(frozen=True)
class Cluster:
    """What the admin API says now: every volume and every job."""

    volumes: Mapping[str, Volume]
    jobs: Mapping[str, Job]

    def newest_job(self) -> int:
        return max((job.number for job in self.jobs.values()), default=0)


@dataclass(frozen=True)
class Report:
    status: Status


@dataclass(frozen=True)
class Start:
    target: str
    source: str
    rate: int
    status: Status


Decision = Report | Start


def decide(spec: Spec, status: Status, target: Resolution, source: Resolution,
           cluster: Cluster) -> Decision:
    """The next step for one VolumeRefresh (see the module for the operator's duties)."""
    if status.phase in FINAL:
        return Report(status)
    if status.job_id:
        return Report(_track(status, cluster))
    if status.started_after is not None:
        adopted = _started_by_us(status, cluster)
        if adopted is not None:
            return Report(_track(replace(status, job_id=adopted.id), cluster))
    return _before_start(spec, status, target, source, cluster)


def after_start_error(status: Status, code: str, message: str) -> Status:
    """The status after StartRefresh failed with gRPC status `code` (its name).
    Unavailable or out of time: the start may be tried again, so the status stays
    Pending (the marker finds the job if it did start). Anything else is the
    controller refusing this refresh: Failed with its message."""
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"):
        return replace(status, phase=Phase.PENDING,
                       message=f"the controller cannot start the refresh now ({code}): "
                               f"{message}; retrying")
    return replace(status, phase=Phase.FAILED, message=f"refused by volkin ({code}): {message}")


def _before_start(spec: Spec, status: Status, target: Resolution, source: Resolution,
                  cluster: Cluster) -> Decision:
    for what, resolution in ((f"target PVC {spec.target_pvc}", target),
                             (f"source {spec.source_description}", source)):
        if isinstance(resolution, Unresolved):
            phase = Phase.FAILED if resolution.final else Phase.PENDING
            return Report(replace(status, phase=phase, message=f"{what}: {resolution.reason}"))
    assert isinstance(target, Handle) and isinstance(source, Handle)
    status = replace(status, target_volume=target.volume, source_volume=source.volume)
    if target.volume == source.volume:
        return _fail(status, f"target PVC {spec.target_pvc} and source "
                             f"{spec.source_description} are the same volume {target.volume}")
    dst = cluster.volumes.get(target.volume)
    src = cluster.volumes.get(source.volume)
    for what, name, found in (("target", target.volume, dst), ("source", source.volume, src)):
        if found is None:
            return _fail(status, f"the {what} volume {name} does not exist in volkin")
    assert dst is not None and src is not None
    if (dst.size_bytes, dst.block_size) != (src.size_bytes, src.block_size):
        return _fail(status, f"sizes differ: target {dst.name} has {dst.size_bytes} bytes in "
                             f"blocks of {dst.block_size}, source {src.name} {src.size_bytes} "
                             f"in blocks of {src.block_size}; a refresh needs equal ones")
    if dst.connections:
        return Report(replace(status, phase=Phase.WAITING,
                              message=f"target volume {dst.name} is in use ({dst.connections} "
                                      f"NBD connection(s)): stop the pods that mount PVC "
                                      f"{spec.target_pvc}; the refresh starts when it is free"))
    busy = [job for job in cluster.jobs.values() if job.target == dst.name and job.active]
    if busy:
        job = min(busy, key=lambda j: j.number)
        return Report(replace(status, phase=Phase.WAITING,
                              message=f"job {job.id} ({job.kind} from {job.source}) is still "
                                      f"copying into {dst.name}; the refresh starts after it"))
    return Start(dst.name, src.name, spec.rate,
                 replace(status, phase=Phase.PENDING, started_after=cluster.newest_job(),
                         message=f"starting the refresh of {dst.name} from {src.name}"))


def _started_by_us(status: Status, cluster: Cluster) -> Job | None:
    """The refresh this resource started before its job id could be recorded."""
    assert status.started_after is not None
    ours = [job for job in cluster.jobs.values()
            if job.kind == "refresh" and job.target == status.target_volume
            and job.source == status.source_volume and job.number > status.started_after]
    return min(ours, key=lambda j: j.number) if ours else None


def _track(status: Status, cluster: Cluster) -> Status:
    """The status that follows the resource's job."""
    job = cluster.jobs.get(status.job_id)
    if job is None:
        return replace(status, phase=Phase.FAILED,
                       message=f"job {status.job_id} is unknown to the controller (was its "
                               f"etcd restored or replaced?): the target is not known to be "
                               f"a copy of the source; delete and re-create this VolumeRefresh "
                               f"to refresh again")
    status = replace(status, blocks_done=job.blocks_done, blocks_total=job.blocks_total)
    if job.state == "running":
        return replace(status, phase=Phase.RUNNING,
                       message=f"copying {job.source} into {job.target}; the target reads as "
                               f"the source already")
    if job.state == "waiting":
        return replace(status, phase=Phase.WAITING, message=f"job {job.id} waits: {job.reason}")
    if job.state == "paused":
        return replace(status, phase=Phase.WAITING,
                       message=f"job {job.id} is paused (`volkin job resume {job.id}`)")
    if job.state == "done" and not job.error:
        return replace(status, phase=Phase.SUCCEEDED, blocks_done=job.blocks_total,
                       message=f"{job.target} is a full copy of {job.source}")
    if job.state == "cancelled" and job.error:  # superseded by a newer refresh
        return replace(status, phase=Phase.FAILED, message=f"job {job.id} was {job.error}")
    if job.state == "cancelled":
        return replace(status, phase=Phase.FAILED,
                       message=f"job {job.id} was cancelled: {job.target} reads as {job.source} "
                               f"did, the blocks not copied through it; `volkin job resume "
                               f"{job.id}` finishes the copy")
    # done with an error (controllers before 2026-11-26 ended a superseded job so)
    return replace(status, phase=Phase.FAILED,
                   message=f"job {job.id} {job.state}: {job.error or 'no reason given'}")


def _fail(status: Status, message: str) -> Report:
    return Report(replace(status, phase=Phase.FAILED, message=message))
