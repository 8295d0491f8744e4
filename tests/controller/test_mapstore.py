"""The engine's maps in a real etcd: O(1) starts, group commit, recovery, fencing, restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from controller.fence import Fence
from controller.guarded import GuardedEtcd
from controller.mapstore import GroupCommit, MapStore
from tests.engine.harness import Harness
from tests.support.etcd import EtcdServer, etcd_server
from volkin import etcd
from volkin.engine import Commit, MapEngine, Plan
from volkin.engine.bitmap import SEGMENT_BITS
from volkin.engine.memstore import MemoryStore
from volkin.engine.vmview import vm_map
from volkin.errors import FencedOut, Unavailable
from volkin.keys import Keys

__all__ = ["etcd_server"]
pytestmark = pytest.mark.integration

B = 16


def unguarded_store(client: etcd.Etcd, prefix: str = "/t") -> MapStore:
    return MapStore(GuardedEtcd(client, Fence.without_lease()), Keys(prefix))


def run(server: EtcdServer, scenario: Callable[[etcd.Etcd], Awaitable[None]]) -> None:
    async def main() -> None:
        client = await etcd.connect([server.endpoint])
        try:
            await scenario(client)
        finally:
            await client.close()

    asyncio.run(main())


async def execute(engine: MapEngine, data: MemoryStore, group: GroupCommit, plan: Plan,
                  payload: bytes = b"", stop_after_commits: int | None = None) -> bytes | None:
    """Carries out a plan as the controller will: data steps on the memories, commits
    through etcd. Stops after `stop_after_commits` commits (a crash)."""
    result = None
    commits = 0
    for step in plan.steps:
        if isinstance(step, Commit):
            if stop_after_commits is not None and commits == stop_after_commits:
                return None
            await group.commit(step)
            commits += 1
        else:
            result = data.run(engine, Plan(plan.unit, (step,)), payload)
    return result


def test_snapshot_and_refresh_of_a_terabyte_volume_write_a_few_records_and_no_segment(
        etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd) -> None:
        store = unguarded_store(client)
        engine = await store.load()
        blocks = (1 << 40) // 65536
        engine.create_volume("v1", blocks, 65536)
        engine.create_volume("v2", blocks, 65536)
        await store.save(engine)
        engine.create_snapshot("v2", "s2")
        await store.save(engine)
        before = set(await client.get_prefix("/t/"))
        engine.create_snapshot("v2", "s3")
        await store.save(engine)
        snapshot_keys = set(await client.get_prefix("/t/")) - before
        before |= snapshot_keys
        engine.start_refresh("v2", "v1")
        await store.save(engine)
        stored = await client.get_prefix("/t/")
        assert not [k for k in stored if k.startswith("/t/maps/")]  # no segment at all
        # A snapshot adds one record of its volume, of its node, of its valid map, of the
        # two new modified intervals and of the reference point, whatever the size:
        assert sorted(k.split("/")[2] for k in snapshot_keys) == [
            "map-meta", "map-meta", "map-meta", "nodes", "synced", "volumes"], snapshot_keys
        assert store.transactions == 4

    run(etcd_server, scenario)


def test_commits_survive_a_controller_restart_and_reads_match_the_model(
        etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd) -> None:
        store = unguarded_store(client)
        h = Harness.filled(("v1", "v2"), 8, B, track_records=False)
        h.snapshot("v2", "s2")
        h.refresh("v2", "v1")
        engine = h.engine
        await store.save(engine)
        group = GroupCommit(store, engine)
        await execute(engine, h.store, group, engine.plan_background("v2", 0))
        plan = engine.plan_write("v1", 3)
        await execute(engine, h.store, group, plan, b"new!")
        h.model.write("v1", 3, 0, b"new!")
        plan = engine.plan_write("s2", 5, whole_block=True)
        await execute(engine, h.store, group, plan, b"S" * B)
        h.model.write("s2", 5, 0, b"S" * B)

        restarted = await unguarded_store(client).load()
        for name in ("v1", "v2", "s2"):
            assert vm_map(restarted, name) == vm_map(engine, name)
        h.engine = restarted
        h.check_all()

    run(etcd_server, scenario)


def test_a_crash_between_commits_recovers_from_what_etcd_holds(
        etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd) -> None:
        store = unguarded_store(client)
        h = Harness.filled(("v1", "v2"), 4, B, track_records=False)
        h.snapshot("v2", "s2")
        h.refresh("v2", "v1")
        await store.save(h.engine)
        group = GroupCommit(store, h.engine)
        plan = h.engine.plan_write("v1", 2)  # push to S2, refresh V2's block, write V1
        assert len(plan.commits) == 2
        old = h.model.read("v1", 2)
        await execute(h.engine, h.store, group, plan, b"lost", stop_after_commits=1)
        h.engine = await unguarded_store(client).load()
        h.check_all()  # the write never happened; everything else as before
        assert h.read("v1", 2) == old

    run(etcd_server, scenario)


def test_concurrent_plans_share_transactions(etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd) -> None:
        store = unguarded_store(client)
        h = Harness.filled(("v1", "v2"), 64, B, track_records=False)
        h.snapshot("v2", "s2")
        h.refresh("v2", "v1")
        await store.save(h.engine)
        group = GroupCommit(store, h.engine)
        before = store.transactions
        plans = [h.engine.plan_background("v2", n) for n in range(64)]
        commits = sum(len(p.commits) for p in plans)
        await asyncio.gather(*(execute(h.engine, h.store, group, p) for p in plans))
        assert store.transactions - before < commits / 4
        assert h.finish("v2") == 0  # every block was refreshed
        h.engine = await unguarded_store(client).load()
        h.check_all()

    run(etcd_server, scenario)


def test_a_controller_that_lost_its_lease_key_cannot_change_a_map(
        etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd) -> None:
        await client.put("/t/leader", b"controller-a")
        fence = Fence.without_lease(1, {"/t/leader": b"controller-a"})
        store = MapStore(GuardedEtcd(client, fence), Keys("/t"))
        h = Harness.filled(("v1", "v2"), 4, B, track_records=False)
        h.refresh("v2", "v1")
        await store.save(h.engine)
        stored = await client.get_prefix("/t/")
        await client.put("/t/leader", b"controller-b")  # another controller took over
        group = GroupCommit(store, h.engine)
        with pytest.raises(FencedOut, match="another one took over"):
            await execute(h.engine, h.store, group, h.engine.plan_background("v2", 1))
        assert fence.deposed  # the term is over: nothing else will be tried
        assert await client.get_prefix("/t/") == {**stored, "/t/leader": b"controller-b"}
        assert 1 in set(h.engine.blocks_to_copy("v2"))  # nothing applied either

    run(etcd_server, scenario)


def test_a_commit_sent_while_etcd_is_down_completes_once_etcd_is_back(
        etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd) -> None:
        store = unguarded_store(client)
        h = Harness.filled(("v1", "v2"), 4, B, track_records=False)
        h.refresh("v2", "v1")
        await store.save(h.engine)
        group = GroupCommit(store, h.engine)
        await execute(h.engine, h.store, group, h.engine.plan_background("v2", 0))
        await asyncio.to_thread(etcd_server.stop)
        waiting = asyncio.create_task(
            execute(h.engine, h.store, group, h.engine.plan_background("v2", 1)))
        await asyncio.sleep(1.5)
        assert not waiting.done()  # it waits for etcd instead of failing
        await asyncio.to_thread(etcd_server.start)
        await asyncio.wait_for(waiting, 30)
        restarted = await unguarded_store(client).load()
        assert set(restarted.blocks_to_copy("v2")) == {2, 3}
        h.engine = restarted
        h.check_all()

    run(etcd_server, scenario)


class LosesAnswers:
    """A real etcd whose first `lose` transaction answers are lost after etcd applied them
    (what a client sees when the connection breaks at the wrong moment)."""

    def __init__(self, client: etcd.Etcd, lose: int) -> None:
        self.client = client
        self.lose = lose
        self.applied_but_lost = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.client, name)

    async def txn(self, **kwargs: object) -> bool:
        done = await self.client.txn(**kwargs)  # type: ignore[arg-type]
        if self.lose > 0:
            self.lose -= 1
            self.applied_but_lost += 1
            raise etcd.EtcdUnavailable("the answer was lost (test)")
        return done


def test_a_change_etcd_applied_but_did_not_confirm_is_never_reverted(
        etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd) -> None:
        h = Harness.filled(("v1", "v2"), 4, B, track_records=False)
        h.refresh("v2", "v1")
        await unguarded_store(client).save(h.engine)
        lossy = LosesAnswers(client, lose=3)
        store = MapStore(GuardedEtcd(lossy, Fence.without_lease()),  # type: ignore[arg-type]
                         Keys("/t"))
        h.engine = await store.load()
        group = GroupCommit(store, h.engine)
        # Blocks 0 and 1 share a segment: block 1's commit is computed from the view
        # block 0's commit left. Had block 0's applied-but-unanswered commit been taken
        # for a failure, block 1's would have written its bit back to 0.
        await execute(h.engine, h.store, group, h.engine.plan_background("v2", 0))
        assert lossy.applied_but_lost == 3
        await execute(h.engine, h.store, group, h.engine.plan_background("v2", 1))
        restarted = await unguarded_store(client).load()
        assert set(restarted.blocks_to_copy("v2")) == {2, 3}
        h.engine = restarted
        h.check_all()

    run(etcd_server, scenario)


def test_a_change_etcd_never_confirms_ends_the_term(etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd) -> None:
        h = Harness.filled(("v1", "v2"), 4, B, track_records=False)
        h.refresh("v2", "v1")
        await unguarded_store(client).save(h.engine)
        lossy = LosesAnswers(client, lose=1000)
        fence = Fence.without_lease()
        store = MapStore(GuardedEtcd(lossy, fence, give_up_after=0.5),  # type: ignore[arg-type]
                         Keys("/t"))
        h.engine = await store.load()
        group = GroupCommit(store, h.engine)
        with pytest.raises(Unavailable, match="stepping down"):
            await execute(h.engine, h.store, group, h.engine.plan_background("v2", 0))
        assert fence.deposed  # this view of the maps is never used again
        with pytest.raises(FencedOut, match="no longer the active one"):
            await execute(h.engine, h.store, group, h.engine.plan_background("v2", 1))
        # What etcd holds is the truth: block 0 was applied there.
        assert set((await unguarded_store(client).load()).blocks_to_copy("v2")) == {1, 2, 3}

    run(etcd_server, scenario)


def test_deleting_a_volume_removes_its_segments(etcd_server: EtcdServer) -> None:
    async def scenario(client: etcd.Etcd) -> None:
        store = unguarded_store(client)
        h = Harness.filled(("v1", "v2"), 4, B, track_records=False)
        h.snapshot("v2", "s2")
        await store.save(h.engine)
        group = GroupCommit(store, h.engine)
        await execute(h.engine, h.store, group, h.engine.plan_write("s2", 1))
        s2_valid = h.engine.graph.nodes[h.engine.volume("s2").node].valid
        assert any(f"/maps/{s2_valid}/" in key for key in await client.get_prefix("/t/maps/"))
        assert h.delete("s2")
        await store.save(h.engine)
        assert not any(f"/maps/{s2_valid}/" in key
                       for key in await client.get_prefix("/t/maps/"))
        h.engine = await unguarded_store(client).load()
        h.check_all()

    run(etcd_server, scenario)


def test_commits_and_deletes_over_more_segments_than_one_etcd_transaction_takes_all_land(
        etcd_server: EtcdServer) -> None:
    """etcd refuses a transaction of more than 128 operations: 300 commits on 300 map
    segments at once (background runs, or many clients) go in several transactions,
    none of them split, and a restarted store reads every bit back."""
    async def scenario(client: etcd.Etcd) -> None:
        store = unguarded_store(client)
        engine = await store.load()
        engine.create_volume("V", 300 * SEGMENT_BITS, 4096)
        engine.create_volume("W", 300 * SEGMENT_BITS, 4096)
        engine.start_refresh("W", "V")
        await store.save(engine)
        runs = [engine.plan_background_run("W", seg * SEGMENT_BITS, SEGMENT_BITS // 2)
                for seg in range(300)]
        assert all(runs)
        before = store.transactions
        await store.commit(engine, [run.commit for run in runs if run is not None])
        assert 3 <= store.transactions - before <= 4
        again = await unguarded_store(client).load()
        for seg in range(300):
            assert again.own_run("W", seg * SEGMENT_BITS, SEGMENT_BITS // 2) is True
            assert again.own_run("W", seg * SEGMENT_BITS + SEGMENT_BITS // 2,
                                 SEGMENT_BITS // 2) is False
        # W made real and deleted: its maps' 300 segments go too, in transactions etcd
        # takes, after the one that deletes its records.
        rest = [engine.plan_background_run("W", seg * SEGMENT_BITS + SEGMENT_BITS // 2,
                                           SEGMENT_BITS // 2) for seg in range(300)]
        await store.commit(engine, [run.commit for run in rest if run is not None])
        assert engine.detach_if_real("W")
        await store.save(engine)
        engine.delete_volume("W")
        await store.save(engine)
        left = await client.get_prefix("/t/maps/")
        assert len(left) < 10, sorted(left)[:20]  # V's maps are defaults: no segments
        assert "W" not in (await unguarded_store(client).load()).graph.volumes

    run(etcd_server, scenario)
