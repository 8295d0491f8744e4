"""The Admin gRPC servicer: converts protobuf to calls on the core and the jobs, and back.

Domain errors become gRPC statuses through `volkin.rpc_status`, in one place
(`_answer`); nothing here decides anything about volumes. The servicer lives as
long as the process; it serves the current leadership term (`attach`) and
answers UNAVAILABLE while this controller is a standby or cannot prove it still
leads — except the cluster's status (`controller.status`), which a standby
answers too.

Audit: `_answer` is also the one place that logs every mutation of the cluster
(the RPCs in `MUTATIONS`), whatever its outcome, as one line

    event=audit.<rpc> who=<peer> <what it named> [error=...] result=ok|<status code>

`who` is the client certificate's common name with TLS, else the gRPC peer's
address (`ipv4:127.0.0.1:40312`). Reads are not audited; who may call what is
`controller.authz`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from controller.jobs import JobRecord, JobState
from controller.nbd.server import NbdServer
from controller.status import AgentHealth, ClusterSurvey
from controller.term import Term
from volkin.api.v1 import admin_pb2, admin_pb2_grpc
from volkin.engine import Kind, VolumeInfo
from volkin.errors import FailedPrecondition, InvalidArgument, Unavailable, VolkinError
from volkin.log import event
from volkin.rpc_status import status_of
from volkin.tls import peer_name

_log = logging.getLogger("controller.service")
_audit = logging.getLogger("controller.audit")
Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

_KIND = {Kind.PRIMARY: admin_pb2.VOLUME_KIND_PRIMARY, Kind.SNAPSHOT: admin_pb2.VOLUME_KIND_SNAPSHOT}
_STATE = {JobState.RUNNING: admin_pb2.JOB_STATE_RUNNING,
          JobState.PAUSED: admin_pb2.JOB_STATE_PAUSED,
          JobState.WAITING: admin_pb2.JOB_STATE_WAITING,
          JobState.DONE: admin_pb2.JOB_STATE_DONE,
          JobState.FAILED: admin_pb2.JOB_STATE_FAILED,
          JobState.CANCELLED: admin_pb2.JOB_STATE_CANCELLED}
_ENDED = (admin_pb2.JOB_STATE_DONE, admin_pb2.JOB_STATE_FAILED, admin_pb2.JOB_STATE_CANCELLED)
_JOB_KIND = {"refresh": admin_pb2.JOB_KIND_REFRESH, "materialize": admin_pb2.JOB_KIND_MATERIALIZE}
WATCH_INTERVAL = 0.2


# The Admin RPCs that change the cluster: each is audited (a test checks that every
# RPC of the service is here or in READS, so a new one cannot be forgotten).
MUTATIONS = frozenset({"CreateVolume", "ResizeVolume", "DeleteVolume", "CreateSnapshot",
                       "StartRefresh", "StartMaterialize", "PauseJob", "ResumeJob", "CancelJob",
                       "SetJobRate"})
READS = frozenset({"GetVolume", "ListVolumes", "GetJob", "ListJobs", "WatchJob",
                   "GetClusterStatus", "ListAgents"})


def identity(context: Context) -> str:
    """The caller's certificate name with TLS, else its address."""
    return peer_name(context.auth_context()) or context.peer() or "-"


def audit_name(rpc: str) -> str:
    """`CreateVolume` -> `create_volume`."""
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in rpc).lstrip("_")


async def _answer(context: Context, call: Callable[[], Awaitable[T]], rpc: str = "",
                  **what: object) -> T:
    """Runs `call`, answering a domain error with its status; for a mutation (`rpc` in
    MUTATIONS, `what` naming its arguments) logs the audit line whatever happens."""
    result, error = "ok", ""
    try:
        return await call()
    except VolkinError as exc:
        result, error = status_of(exc).name, exc.message
        event(_log, "admin.refused", code=result, error=exc.message)
        await context.abort(status_of(exc), exc.message)
        raise  # abort raises; this keeps type checkers sure nothing returns
    except asyncio.CancelledError:
        result, error = grpc.StatusCode.CANCELLED.name, "the call was cancelled"
        raise
    except Exception as exc:
        result, error = grpc.StatusCode.UNKNOWN.name, f"internal error: {exc!r}"
        raise
    finally:
        if rpc in MUTATIONS:
            fields: dict[str, Any] = {"who": identity(context), **what,
                                      **({"error": error} if error else {}), "result": result}
            event(_audit, f"audit.{audit_name(rpc)}",
                  logging.INFO if result == "ok" else logging.WARNING, **fields)


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, nbd: NbdServer, default_block_size: int, node_id: str = "",
                 survey: ClusterSurvey | None = None) -> None:
        self._nbd = nbd
        self._default_block_size = default_block_size
        self._node_id = node_id
        self._survey = survey
        self._term: Term | None = None

    def attach(self, term: Term) -> None:
        self._term = term

    def detach(self) -> None:
        self._term = None

    def _current(self) -> Term:
        term = self._term
        if term is None:
            raise Unavailable(f"controller {self._node_id} is a standby; use the active "
                              f"controller (its address is in etcd, see `volkin status`)")
        term.fence.check()
        return term

    # -- conversions -------------------------------------------------------------
    def _volume(self, term: Term, info: VolumeInfo) -> admin_pb2.Volume:
        size = info.size_blocks * info.block_size
        layout = term.core.placement.layout_of(info.memory)
        return admin_pb2.Volume(
            name=info.name, size_bytes=size,
            block_size=info.block_size, kind=_KIND[info.kind], source=info.source or "",
            valid_blocks=info.valid_blocks, total_blocks=info.size_blocks,
            agents=list(layout.nodes) if layout else [],
            stripe_unit_bytes=min(layout.unit, size) if layout else 0,
            stripe_width=layout.width if layout else 0,
            connections=self._nbd.connections(info.name))

    def _job(self, term: Term, record: JobRecord) -> admin_pb2.Job:
        status = term.jobs.status(record)
        return admin_pb2.Job(
            id=record.id, kind=_JOB_KIND[record.kind], state=_STATE[status.state],
            target=record.target, source=record.source, blocks_total=record.blocks_total,
            blocks_done=status.blocks_done, bytes_copied=status.bytes_copied,
            rate_bytes_per_second=record.rate, error=record.error, reason=status.reason,
            waiting_seconds=round(status.waiting_seconds, 1))

    # -- volumes -------------------------------------------------------------------
    async def CreateVolume(self, request: admin_pb2.CreateVolumeRequest,
                           context: Context) -> admin_pb2.Volume:
        async def call() -> admin_pb2.Volume:
            if request.size_bytes == 0:
                raise InvalidArgument("a volume needs a size (for example 1GiB)")
            term = self._current()
            block_size = request.block_size or self._default_block_size
            info = await term.core.create_volume(request.name, request.size_bytes, block_size,
                                                 request.stripe_unit_bytes, request.stripe_width)
            layout = term.core.placement.layout_of(info.memory)
            event(_log, "volume.created", volume=info.name, size=request.size_bytes,
                  block_size=block_size, stripe_unit=layout.unit if layout else 0,
                  agents=",".join(layout.nodes) if layout else "")
            return self._volume(term, info)
        return await _answer(context, call, "CreateVolume", volume=request.name,
                             size=request.size_bytes, block_size=request.block_size)

    async def GetVolume(self, request: admin_pb2.GetVolumeRequest,
                        context: Context) -> admin_pb2.Volume:
        async def call() -> admin_pb2.Volume:
            term = self._current()
            volume = self._volume(term, term.core.engine.info(request.name))
            volume.allocated_bytes = await term.core.allocated_bytes(request.name)
            return volume
        return await _answer(context, call)

    async def ListVolumes(self, request: admin_pb2.ListVolumesRequest,
                          context: Context) -> admin_pb2.ListVolumesResponse:
        async def call() -> admin_pb2.ListVolumesResponse:
            term = self._current()
            return admin_pb2.ListVolumesResponse(
                volumes=[self._volume(term, info) for info in term.core.engine.volumes()])
        return await _answer(context, call)

    async def ResizeVolume(self, request: admin_pb2.ResizeVolumeRequest,
                           context: Context) -> admin_pb2.Volume:
        async def call() -> admin_pb2.Volume:
            if request.size_bytes == 0:
                raise InvalidArgument("a resize needs the new size (for example 2GiB)")
            term = self._current()
            before = term.core.size(request.name)
            info = await term.core.resize_volume(request.name, request.size_bytes)
            event(_log, "volume.resized", volume=info.name, size=request.size_bytes,
                  was=before)
            return self._volume(term, info)
        return await _answer(context, call, "ResizeVolume", volume=request.name,
                             size=request.size_bytes)

    async def DeleteVolume(self, request: admin_pb2.DeleteVolumeRequest,
                           context: Context) -> admin_pb2.DeleteVolumeResponse:
        async def call() -> admin_pb2.DeleteVolumeResponse:
            term = self._current()
            term.core.engine.info(request.name)  # NotFound first
            clients = self._nbd.connections(request.name)
            if clients and not request.force:
                raise FailedPrecondition(
                    f"volume {request.name!r} has {clients} NBD connection(s) open; disconnect "
                    f"the clients first, or delete with --force to close them")
            closed = self._nbd.disconnect(request.name)
            await term.core.delete_volume(request.name)
            await term.jobs.target_deleted(request.name)
            self._nbd.disconnect(request.name)  # any that connected meanwhile
            event(_log, "volume.deleted", volume=request.name, closed_connections=closed)
            return admin_pb2.DeleteVolumeResponse()
        return await _answer(context, call, "DeleteVolume", volume=request.name,
                             force=request.force)

    async def CreateSnapshot(self, request: admin_pb2.CreateSnapshotRequest,
                             context: Context) -> admin_pb2.Volume:
        async def call() -> admin_pb2.Volume:
            term = self._current()
            info = await term.core.create_snapshot(request.source, request.name)
            event(_log, "snapshot.created", volume=info.name, source=request.source)
            return self._volume(term, info)
        return await _answer(context, call, "CreateSnapshot", volume=request.name,
                             source=request.source)

    # -- refresh and jobs ------------------------------------------------------------
    async def StartRefresh(self, request: admin_pb2.StartRefreshRequest,
                           context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            term = self._current()
            record = await term.jobs.start_refresh(request.target, request.source,
                                                   request.rate_bytes_per_second)
            event(_log, "refresh.started", job=record.id, target=request.target,
                  source=request.source, blocks=record.blocks_total)
            return self._job(term, record)
        return await _answer(context, call, "StartRefresh", target=request.target,
                             source=request.source, rate=request.rate_bytes_per_second)

    async def StartMaterialize(self, request: admin_pb2.StartMaterializeRequest,
                               context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            term = self._current()
            record = await term.jobs.start_materialize(request.name,
                                                       request.rate_bytes_per_second)
            event(_log, "materialize.started", job=record.id, volume=request.name,
                  blocks=record.blocks_total)
            return self._job(term, record)
        return await _answer(context, call, "StartMaterialize", volume=request.name,
                             rate=request.rate_bytes_per_second)

    async def GetJob(self, request: admin_pb2.GetJobRequest, context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            term = self._current()
            return self._job(term, term.jobs.get(request.id))
        return await _answer(context, call)

    async def ListJobs(self, request: admin_pb2.ListJobsRequest,
                       context: Context) -> admin_pb2.ListJobsResponse:
        async def call() -> admin_pb2.ListJobsResponse:
            term = self._current()
            return admin_pb2.ListJobsResponse(jobs=[self._job(term, r) for r in term.jobs.list()])
        return await _answer(context, call)

    async def PauseJob(self, request: admin_pb2.PauseJobRequest,
                       context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            term = self._current()
            return self._job(term, await term.jobs.pause(request.id))
        return await _answer(context, call, "PauseJob", job=request.id)

    async def ResumeJob(self, request: admin_pb2.ResumeJobRequest,
                        context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            term = self._current()
            return self._job(term, await term.jobs.resume(request.id))
        return await _answer(context, call, "ResumeJob", job=request.id)

    async def CancelJob(self, request: admin_pb2.CancelJobRequest,
                        context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            term = self._current()
            return self._job(term, await term.jobs.cancel(request.id))
        return await _answer(context, call, "CancelJob", job=request.id)

    async def SetJobRate(self, request: admin_pb2.SetJobRateRequest,
                         context: Context) -> admin_pb2.Job:
        async def call() -> admin_pb2.Job:
            term = self._current()
            return self._job(term, await term.jobs.set_rate(request.id,
                                                            request.rate_bytes_per_second))
        return await _answer(context, call, "SetJobRate", job=request.id,
                             rate=request.rate_bytes_per_second)

    # -- the cluster (a standby answers too) ------------------------------------------
    def _surveyor(self) -> ClusterSurvey:
        if self._survey is None:
            raise Unavailable(f"controller {self._node_id} has no etcd to ask")
        return self._survey

    async def GetClusterStatus(self, request: admin_pb2.GetClusterStatusRequest,
                               context: Context) -> admin_pb2.ClusterStatus:
        async def call() -> admin_pb2.ClusterStatus:
            term = self._term
            states = ([term.jobs.status(r).state for r in term.jobs.list()]
                      if term is not None else None)
            known = term.core.agents.directory.records if term is not None else None
            health = await self._surveyor().cluster(states, known)
            leader, etcd, jobs = health.leader, health.etcd, health.jobs
            return admin_pb2.ClusterStatus(
                healthy=health.healthy, problems=health.problems,
                controller=admin_pb2.ControllerStatus(
                    leader=leader.node_id, leader_admin_address=leader.admin_address,
                    leader_nbd_address=leader.nbd_address, epoch=leader.epoch,
                    answered_by=self._node_id, answered_by_leader=term is not None),
                agents=[_agent(a) for a in health.agents],
                etcd=admin_pb2.EtcdHealth(
                    healthy=etcd.healthy, error=etcd.error, db_size_bytes=etcd.db_size_bytes,
                    db_size_in_use_bytes=etcd.db_size_in_use_bytes,
                    db_quota_bytes=etcd.db_quota_bytes, revision=etcd.revision,
                    alarms=list(etcd.alarms)),
                jobs=admin_pb2.JobCounts(
                    running=jobs[JobState.RUNNING], waiting=jobs[JobState.WAITING],
                    paused=jobs[JobState.PAUSED], failed=jobs[JobState.FAILED],
                    done=jobs[JobState.DONE], cancelled=jobs[JobState.CANCELLED]))
        return await _answer(context, call)

    async def ListAgents(self, request: admin_pb2.ListAgentsRequest,
                         context: Context) -> admin_pb2.ListAgentsResponse:
        async def call() -> admin_pb2.ListAgentsResponse:
            return admin_pb2.ListAgentsResponse(
                agents=[_agent(a) for a in await self._surveyor().agents()])
        return await _answer(context, call)

    async def WatchJob(self, request: admin_pb2.GetJobRequest,
                       context: Context) -> AsyncIterator[admin_pb2.Job]:
        async def current() -> admin_pb2.Job:
            term = self._current()
            return self._job(term, term.jobs.get(request.id))
        last = await _answer(context, current)
        yield last
        while last.state not in _ENDED:
            await asyncio.sleep(WATCH_INTERVAL)
            now = await _answer(context, current)
            if now != last:
                yield now
                last = now


def _agent(agent: AgentHealth) -> admin_pb2.Agent:
    return admin_pb2.Agent(
        node_id=agent.node_id, address=agent.address, data_address=agent.data_address,
        registered=agent.registered, alive=agent.alive, error=agent.error,
        capacity_bytes=agent.capacity_bytes, used_bytes=agent.used_bytes,
        available_bytes=agent.available_bytes, extents=agent.extents, epoch=agent.epoch)
