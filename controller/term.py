"""One leadership term: everything that acts on the cluster, built after the fence.

A term begins once this controller holds the leader key with a new epoch
(`Leadership.acquire`). In this order, before anything is served:

1. every registered agent is fenced at the new epoch (`AgentClient.fence_all`),
   so no older controller can change a byte any more;
2. the maps, the placement and the jobs are loaded from etcd, which a deposed
   controller can no longer change either (its transactions are guarded);
3. jobs resume; the NBD server and the admin API are attached.

A term ends when its fence is deposed or the process stops: jobs stop, agent
channels close. Nothing from an ended term can act again — its fence never becomes
valid again — and the next term rebuilds everything from etcd.
"""

from __future__ import annotations

from controller.agents import AgentClient, AgentDirectory
from controller.config import ControllerConfig
from controller.core import Core
from controller.fence import Fence
from controller.guarded import GuardedEtcd
from controller.jobs import Jobs
from controller.leadership import lease_margin
from controller.mapstore import MapStore
from controller.placement import Placement
from volkin.etcd import Etcd
from volkin.keys import Keys


class Term:
    def __init__(self, fence: Fence, etcd: GuardedEtcd, core: Core, jobs: Jobs) -> None:
        self.fence = fence
        self.etcd = etcd
        self.core = core
        self.jobs = jobs

    @property
    def epoch(self) -> int:
        return self.fence.epoch

    @staticmethod
    async def begin(config: ControllerConfig, client: Etcd, keys: Keys, fence: Fence) -> Term:
        guarded = GuardedEtcd(client, fence, give_up_after=max(config.io_wait, 10.0))
        directory = AgentDirectory(client, keys)
        agents = AgentClient(directory, fence, config.io_wait)
        await agents.fence_all(client, margin=lease_margin(config.lease_ttl))

        async def persist_placement(placement: Placement) -> None:
            await guarded.put(keys.placement, placement.to_json())

        store = MapStore(guarded, keys)
        engine = await store.load()
        placement = Placement(directory.nodes())
        stored = await client.get(keys.placement)
        if stored:
            placement.load_json(stored)
        core = Core(engine, store, placement, agents, persist_placement)
        jobs = Jobs(core, guarded, keys, config.job_fail_after)
        await jobs.load()
        return Term(fence, guarded, core, jobs)

    async def end(self) -> None:
        self.fence.depose(self.fence.reason or "the controller is stopping")
        await self.jobs.stop()
        await self.core.close()
