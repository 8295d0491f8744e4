"""The cluster as an operator asks about it: who leads, which agents answer, etcd's health.

`ClusterSurvey` reads etcd and asks each agent directly, with short timeouts, and
needs no leadership term: a standby answers too, which is how `volkin status` can
say who leads while this controller does not. It changes nothing.

What counts as an agent: every registration under `Keys.agents`, and every node
named by a placement record (`Keys.extents`) — an agent that holds extents and
died has no registration once its lease expires, and must show as down, not
vanish. Alive: registered and answered `StatStore` within `timeout` seconds.

Healthy: a leader is elected, every agent is alive, and etcd answered its Status
call with no alarm raised. Each thing that is not so is one line in `problems`.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc

from controller.agents import CHANNEL_OPTIONS
from controller.jobs import JobRecord, JobState
from controller.placement import Layout
from volkin.api.v1 import agent_pb2
from volkin.blockclient import AgentConnections
from volkin.errors import VolkinError
from volkin.etcd import Etcd, EtcdUnavailable
from volkin.keys import Keys
from volkin.rpc_status import error_from_agent

# Seconds an agent has to answer StatStore before it counts as not answering.
AGENT_TIMEOUT = 2.0


@dataclass(frozen=True)
class AgentHealth:
    node_id: str
    address: str = ""
    data_address: str = ""
    registered: bool = False
    alive: bool = False
    error: str = ""  # why it is not alive, one line
    capacity_bytes: int = 0
    used_bytes: int = 0
    available_bytes: int = 0
    extents: int = 0
    epoch: int = 0


@dataclass(frozen=True)
class EtcdHealth:
    healthy: bool
    error: str = ""
    db_size_bytes: int = 0
    db_size_in_use_bytes: int = 0
    db_quota_bytes: int = 0
    revision: int = 0
    alarms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Leader:
    node_id: str  # "" while none leads
    admin_address: str
    nbd_address: str
    epoch: int


@dataclass(frozen=True)
class ClusterHealth:
    leader: Leader
    agents: list[AgentHealth]
    etcd: EtcdHealth
    jobs: Counter[JobState]
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


class ClusterSurvey:
    def __init__(self, etcd: Etcd, keys: Keys, timeout: float = AGENT_TIMEOUT) -> None:
        self._etcd = etcd
        self._keys = keys
        self._timeout = timeout

    async def close(self) -> None:
        """Nothing stays open between calls (each asks the agents on channels of its own,
        so an agent that moved leaves no channel behind)."""

    async def cluster(self, jobs: Iterable[JobState] | None = None,
                      known: Mapping[str, Mapping[str, object]] | None = None
                      ) -> ClusterHealth:
        """Everything at once. `jobs`: the states of the jobs as the leader reports them
        (with `waiting`); None reads the stored states from etcd. `known`: the agents'
        registrations as the leader last read them, asked instead when etcd cannot be."""
        etcd = await self.etcd()
        counts = Counter(jobs) if jobs is not None else Counter()
        try:
            leader = await self.leader()
            agents = await self.agents()
            if jobs is None:
                counts = await self._stored_job_states()
        except EtcdUnavailable:
            leader = Leader("", "", "", 0)
            agents = await self._ask({node: dict(record)
                                      for node, record in (known or {}).items()})
        problems = []
        if not etcd.healthy:
            problems.append(f"etcd: {etcd.error}")
        elif not leader.node_id:
            problems.append("no controller leads (is volkin-controller running?)")
        problems += [f"agent {a.node_id}: {a.error}" for a in agents if not a.alive]
        return ClusterHealth(leader, agents, etcd, counts, problems)

    async def etcd(self) -> EtcdHealth:
        try:
            status = await self._etcd.status()
            alarms = tuple(await self._etcd.alarms())
        except VolkinError as exc:
            return EtcdHealth(False, exc.message)
        error = f"alarm raised: {', '.join(alarms)} (see docs/operations.md)" if alarms else ""
        return EtcdHealth(not alarms, error, status.db_size, status.db_size_in_use,
                          status.db_size_quota, status.revision, alarms)

    async def leader(self) -> Leader:
        claim = await self._etcd.get(self._keys.leader)
        served = await self._etcd.get(self._keys.controller_address)
        epoch = await self._etcd.get(self._keys.epoch)
        node = _field(claim, "node_id")
        same = _field(served, "node_id") == node  # the address of this term, not the last
        return Leader(node, _field(served, "admin") if same else "",
                      _field(served, "nbd") if same else "",
                      int(epoch) if epoch and epoch.isdigit() else 0)

    async def agents(self) -> list[AgentHealth]:
        """Every agent registered or holding extents, asked at once whether it answers."""
        records: dict[str, dict[str, object]] = {}
        for raw in (await self._etcd.get_prefix(self._keys.agents)).values():
            try:
                record = json.loads(raw)
                records[str(record["node_id"])] = record
            except (ValueError, KeyError, TypeError):
                continue
        holding: set[str] = set()
        for raw in (await self._etcd.get_prefix(self._keys.extents)).values():
            try:
                holding.update(Layout.from_record(raw, 0).nodes)
            except (ValueError, KeyError, TypeError):
                continue
        return await self._ask({node: records.get(node) for node in set(records) | holding})

    async def _ask(self, records: Mapping[str, dict[str, object] | None]) -> list[AgentHealth]:
        """Each agent (None: not registered) asked at once, in node order."""
        connections = AgentConnections(CHANNEL_OPTIONS)
        try:
            return list(await asyncio.gather(*(self._agent(connections, node, records[node])
                                               for node in sorted(records))))
        finally:
            await connections.close()

    async def _agent(self, connections: AgentConnections, node: str,
                     record: dict[str, object] | None) -> AgentHealth:
        if record is None:
            return AgentHealth(node, error="holds extents but is not registered in etcd (its "
                                           "lease expired: is volkin-agent running there?)")
        address = str(record.get("address", ""))
        data_address = str(record.get("data_address", ""))
        try:
            stats = await connections.stub(address).StatStore(
                agent_pb2.StatStoreRequest(), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # it answers: an older agent
                return AgentHealth(node, address, data_address, registered=True, alive=True,
                                   error="answers, but is too old to report its space "
                                         "(no StatStore)")
            error = error_from_agent(exc.code(), " ".join((exc.details() or "").split()))
            return AgentHealth(node, address, data_address, registered=True,
                               error=f"registered but does not answer at {address}: "
                                     f"{error.message}")
        return AgentHealth(node, address, data_address, registered=True, alive=True,
                           capacity_bytes=stats.capacity_bytes, used_bytes=stats.used_bytes,
                           available_bytes=stats.available_bytes, extents=stats.extents,
                           epoch=stats.epoch)

    async def _stored_job_states(self) -> Counter[JobState]:
        counts: Counter[JobState] = Counter()
        for raw in (await self._etcd.get_prefix(self._keys.jobs)).values():
            try:
                counts[JobRecord.from_json(raw).state] += 1
            except (VolkinError, ValueError, KeyError, TypeError):
                continue
        return counts


def _field(raw: bytes | None, name: str) -> str:
    if raw is None:
        return ""
    try:
        return str(json.loads(raw).get(name, ""))
    except (ValueError, AttributeError):
        return ""
