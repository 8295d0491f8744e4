"""One leadership term: everything that acts on the cluster, built after the fence.

A term begins once this controller holds the leader key with a new epoch
(`Leadership.acquire`). In this order, before anything is served:

1. every registered agent is fenced at the new epoch (`AgentClient.fence_all`),
   so no older controller can change a byte any more;
2. a prefix written by the previous layout of keys is migrated to records
   (`controller.migration`);
3. the maps, the placement and the jobs are loaded from etcd, which a deposed
   controller can no longer change either (its transactions are guarded);
4. memories released but not yet freed (a crash in between) are freed; jobs
   resume; etcd's history is compacted behind the term (`controller.history`);
   the NBD server and the admin API are attached.

A term ends when its fence is deposed or the process stops: jobs stop, agent
channels close. Nothing from an ended term can act again — its fence never becomes
valid again — and the next term rebuilds everything from etcd.
"""

from __future__ import annotations

import asyncio
import logging

from controller.agents import AgentClient, AgentDirectory
from controller.config import ControllerConfig
from controller.core import Core
from controller.fence import Fence
from controller.guarded import GuardedEtcd
from controller.history import HistoryCompactor
from controller.jobs import Jobs
from controller.leadership import lease_margin
from controller.mapstore import MapStore
from controller.metrics import ControllerMetrics
from controller.migration import migrate
from controller.placement import Placement
from volkin.engine import MapEngine, VolumeNotFound
from volkin.errors import Unavailable
from volkin.etcd import Etcd
from volkin.keys import Keys
from volkin.log import event

_log = logging.getLogger("controller.term")


class Term:
    def __init__(self, fence: Fence, etcd: GuardedEtcd, core: Core, jobs: Jobs,
                 compacting: asyncio.Task[None] | None = None) -> None:
        self.fence = fence
        self.etcd = etcd
        self.core = core
        self.jobs = jobs
        self.compacting = compacting  # etcd's history, compacted behind this term

    @property
    def epoch(self) -> int:
        return self.fence.epoch

    @staticmethod
    async def begin(config: ControllerConfig, client: Etcd, keys: Keys, fence: Fence,
                    metrics: ControllerMetrics | None = None) -> Term:
        metrics = metrics or ControllerMetrics()
        guarded = GuardedEtcd(client, fence, give_up_after=max(config.io_wait, 10.0),
                              metrics=metrics.etcd)
        directory = AgentDirectory(client, keys)
        agents = AgentClient(directory, fence, config.io_wait)
        await agents.fence_all(client, margin=lease_margin(config.lease_ttl))
        await migrate(guarded, keys)
        store = MapStore(guarded, keys, metrics.commits)
        engine = await store.load()
        placement = Placement(directory.nodes(), config.stripe_unit, config.stripe_width,
                              config.extent_bytes)
        placement.load_records({key[len(keys.extents):]: raw for key, raw in
                                (await client.get_prefix(keys.extents)).items()},
                               lambda memory: _memory_size(engine, memory))
        core = Core(engine, store, placement, agents, keys)
        jobs = Jobs(core, guarded, keys, config.job_fail_after, config.busy_copy_blocks,
                    config.job_history)
        await jobs.load()
        try:
            await core.free_released()
        except Unavailable as exc:  # an agent is away: next time
            event(_log, "controller.free_later", logging.WARNING, error=exc.message)
        compacting = asyncio.create_task(
            HistoryCompactor(client, fence, config.compact_every).run(), name="compactor")
        return Term(fence, guarded, core, jobs, compacting)

    async def end(self) -> None:
        self.fence.depose(self.fence.reason or "the controller is stopping")
        if self.compacting is not None:
            self.compacting.cancel()
            await asyncio.gather(self.compacting, return_exceptions=True)
        await self.jobs.stop()
        await self.core.close()


def _memory_size(engine: MapEngine, memory: str) -> int | None:
    """The size of a memory some volume still uses (None: released, only to be freed)."""
    try:
        volume = engine.volume_of_memory(memory)
    except VolumeNotFound:
        return None
    return volume.size_blocks * volume.block_size
