"""Plans carried out on real agent processes and a real etcd: an instant refresh end to end.

V1 lives on one agent, V2 on another and S2 on the first again, so the refresh
copies move agent to agent. Writes to all three volumes run concurrently with
the background copy; afterwards every block of every volume, read through the
agents, equals the reference model, and so it does for a controller that
starts again from what etcd holds.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from controller.executor import PlanExecutor
from controller.locks import FamilyLocks
from controller.mapstore import GroupCommit
from controller.placement import Placement
from tests.agent.conftest import AgentFactory
from tests.controller.conftest import agent_client, map_store
from tests.support.etcd import EtcdServer
from volkin import etcd
from volkin.engine import MapEngine
from volkin.engine.reference import ReferenceModel

pytestmark = pytest.mark.integration

BLOCK = 4096
BLOCKS = 48


def pattern(tag: int) -> bytes:
    return random.Random(tag).randbytes(BLOCK)


async def read_all(executor: PlanExecutor, engine: MapEngine, name: str) -> list[bytes]:
    out = []
    for n in range(BLOCKS):
        data = await executor.run(engine.plan_read(name, n))
        assert data is not None
        out.append(bytes(data))
    return out


def test_a_refresh_across_agents_with_writes_everywhere_during_the_copy(
        etcd_server: EtcdServer, start_agent: AgentFactory) -> None:
    a1, a2 = start_agent("a1"), start_agent("a2")

    async def scenario() -> None:
        client = await etcd.connect([etcd_server.endpoint])
        store = map_store(client)
        engine = await store.load()
        model = ReferenceModel(BLOCK)
        group = GroupCommit(store, engine)
        placement = Placement(["a1", "a2"], width=1)  # each volume on one agent
        executor = PlanExecutor(engine, group, placement, agent_client(a1, a2))
        locks = FamilyLocks(engine)

        async def write(name: str, n: int, data: bytes, offset: int = 0) -> None:
            async with locks.plan(name, [n]):
                whole = offset == 0 and len(data) == BLOCK
                await executor.run(engine.plan_write(name, n, whole), data, offset)
                model.write(name, n, offset, data)

        try:
            for name in ("V1", "V2"):
                info = engine.create_volume(name, BLOCKS, BLOCK)
                model.create_volume(name, BLOCKS)
                await executor.create_memory(info.memory)
            await store.save(engine)
            for n in range(BLOCKS):
                await write("V1", n, pattern(n))
                await write("V2", n, pattern(1000 + n))
            info = engine.create_snapshot("V2", "S2")
            model.create_snapshot("V2", "S2")
            await executor.create_memory(info.memory)
            await store.save(engine)
            extents = {name: placement.nodes_of(engine.volume(name).memory)[0]
                       for name in ("V1", "V2", "S2")}
            assert extents["V1"] != extents["V2"]  # the refresh crosses agents

            started = engine.start_refresh("V2", "V1")
            model.refresh("V2", "V1")
            await store.save(engine)
            assert started.blocks_to_copy == BLOCKS

            async def background() -> None:
                for n in list(engine.blocks_to_copy("V2")):
                    async with locks.plan("V2", [n]):
                        await executor.run(engine.plan_background("V2", n))

            async def writers() -> None:
                rng = random.Random(7)
                for i in range(60):
                    name = rng.choice(["V1", "V2", "S2"])
                    n = rng.randrange(BLOCKS)
                    if rng.random() < 0.5:
                        await write(name, n, pattern(5000 + i))
                    else:
                        await write(name, n, b"\xab" * 512, offset=512 * rng.randrange(8))

            await asyncio.gather(background(), writers())
            assert engine.detach_if_real("V2")
            await store.save(engine)
            for name in ("V1", "V2", "S2"):
                assert await read_all(executor, engine, name) == model.volumes[name], name

            # A controller starting again sees the same volumes from etcd alone.
            restarted = await map_store(client).load()
            fresh = PlanExecutor(restarted, GroupCommit(store, restarted), placement,
                                 agent_client(a1, a2))
            try:
                for name in ("V1", "V2", "S2"):
                    assert await read_all(fresh, restarted, name) == model.volumes[name], name
            finally:
                await fresh.close()
        finally:
            await executor.close()
            await client.close()

    asyncio.run(scenario())


def test_concurrent_copies_between_the_same_extents_share_agent_calls() -> None:
    from controller.batching import Batcher
    from volkin.api.v1 import agent_pb2

    calls: list[list[int]] = []

    async def send(key: tuple[str, str, str, str], ranges: list[agent_pb2.CopyRange]) -> None:
        calls.append([r.source_offset for r in ranges])
        await asyncio.sleep(0.01)
        if any(r.source_offset == 666 for r in ranges):
            raise RuntimeError("agent down")

    async def scenario() -> None:
        batcher: Batcher[tuple[str, str, str, str], agent_pb2.CopyRange] = Batcher(send)
        key = ("a1", "m1", "m2", "")
        await asyncio.gather(*(batcher.submit(key, agent_pb2.CopyRange(source_offset=n))
                               for n in range(10)))
        assert sorted(n for call in calls for n in call) == list(range(10))
        assert len(calls) < 10
        calls.clear()
        results = await asyncio.gather(
            batcher.submit(key, agent_pb2.CopyRange(source_offset=1)),
            batcher.submit(key, agent_pb2.CopyRange(source_offset=666)),
            batcher.submit(key, agent_pb2.CopyRange(source_offset=2)),
            return_exceptions=True)
        # Queued together, sent together: when that call fails, every copy in it fails
        # (none of them may be committed as valid).
        assert calls == [[1, 666, 2]]
        assert all(isinstance(r, RuntimeError) for r in results), results

    asyncio.run(scenario())


def test_a_batcher_with_several_sends_in_flight_caps_each_and_sends_every_item_once() -> None:
    from controller.batching import Batcher

    sent: list[list[int]] = []
    in_flight = most = 0

    async def send(key: str, items: list[int]) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        sent.append(items)
        await asyncio.sleep(0.01)
        in_flight -= 1
        if 13 in items:
            raise RuntimeError("agent down")

    async def scenario() -> None:
        batcher: Batcher[str, int] = Batcher(send, in_flight=3, max_items=4)
        results = await asyncio.gather(*(batcher.submit("k", n) for n in range(40)),
                                       return_exceptions=True)
        assert sorted(n for items in sent for n in items) == list(range(40))
        assert all(len(items) <= 4 for items in sent)
        assert most == 3
        # Only the items that rode with 13 failed.
        with_13 = next(items for items in sent if 13 in items)
        failed = {n for n, r in enumerate(results) if isinstance(r, RuntimeError)}
        assert failed == set(with_13)
        assert batcher._queues == {} and batcher._sending == {}  # nothing left behind

    asyncio.run(scenario())


def test_family_locks_serialise_per_block_and_leave_nothing_behind() -> None:
    async def scenario() -> None:
        engine = MapEngine()
        engine.create_volume("v", 16, 512)
        locks = FamilyLocks(engine)
        order: list[str] = []

        async def holder(name: str, blocks: list[int], pause: float) -> None:
            async with locks.plan("v", blocks):
                order.append(f"{name}+")
                await asyncio.sleep(pause)
                order.append(f"{name}-")

        # b and c overlap a on block 5 and must wait; d touches other blocks and runs at once.
        await asyncio.gather(holder("a", [5, 1], 0.05), holder("b", [9, 5], 0.01),
                             holder("c", [5], 0.01), holder("d", [7], 0.0))
        assert order.index("a-") < order.index("b+") and order.index("a-") < order.index("c+")
        assert order.index("d-") < order.index("a-")
        assert len(locks) == 0  # no lock outlives its holders
        for n in range(16):
            async with locks.plan("v", [n]):
                pass
        assert len(locks) == 0

    asyncio.run(scenario())


def test_a_run_waits_for_plans_in_its_range_and_plans_in_it_wait_for_the_run() -> None:
    async def scenario() -> None:
        engine = MapEngine()
        engine.create_volume("v", 1 << 20, 512)
        locks = FamilyLocks(engine)
        order: list[str] = []

        async def plan(name: str, blocks: list[int], delay: float) -> None:
            await asyncio.sleep(delay)
            async with locks.plan("v", blocks):
                order.append(f"{name}+")
                await asyncio.sleep(0.03)
                order.append(f"{name}-")

        async def run(name: str, first: int, count: int, delay: float) -> None:
            await asyncio.sleep(delay)
            async with locks.run("v", first, count):
                order.append(f"{name}+")
                await asyncio.sleep(0.05)
                order.append(f"{name}-")

        # p1 holds block 500 when R (blocks 0..999_999) starts: R waits for it; p2 wants
        # block 700_000 after R started and waits for R; p3 (block 1_000_000, past R's
        # end) does not wait; R2 overlaps R and waits for it.
        await asyncio.gather(plan("p1", [500], 0.0), run("R", 0, 1_000_000, 0.01),
                             plan("p2", [700_000], 0.02), plan("p3", [1_000_000], 0.02),
                             run("R2", 999_000, 10, 0.02))
        assert order.index("p1-") < order.index("R+")
        assert order.index("R-") < order.index("p2+")
        assert order.index("R-") < order.index("R2+")
        assert order.index("p3+") < order.index("R-")
        assert len(locks) == 0 and not locks._runs  # nothing kept per block of a run

    asyncio.run(scenario())


def test_a_topology_change_waits_for_its_familys_plans_and_theirs_wait_for_it() -> None:
    async def scenario() -> None:
        engine = MapEngine()
        for name in ("v", "other"):
            engine.create_volume(name, 16, 512)
        locks = FamilyLocks(engine)
        order: list[str] = []

        async def plan(name: str, volume: str, delay: float) -> None:
            await asyncio.sleep(delay)
            async with locks.plan(volume, [3]):
                order.append(f"{name}+")
                await asyncio.sleep(0.03)
                order.append(f"{name}-")

        async def topology() -> None:
            await asyncio.sleep(0.01)  # while plan p1 is in flight
            async with locks.topology("v"):
                order.append("T+")
                await asyncio.sleep(0.05)
                order.append("T-")

        # p1 and p2 are v's: T waits for p1, p2 waits for T. q (another family, same
        # block number) neither waits for T nor holds it up.
        await asyncio.gather(plan("p1", "v", 0), topology(), plan("p2", "v", 0.02),
                             plan("q", "other", 0.02))
        v_order = [e for e in order if not e.startswith("q")]
        assert v_order == ["p1+", "p1-", "T+", "T-", "p2+", "p2-"]
        assert order.index("q+") < order.index("T-") and order.index("q-") < order.index("T-")

    asyncio.run(scenario())


def test_a_plan_waiting_while_a_refresh_joins_two_families_follows_its_volume() -> None:
    async def scenario() -> None:
        engine = MapEngine()
        for name in ("a", "b"):
            engine.create_volume(name, 16, 512)
        locks = FamilyLocks(engine)
        inside: list[str] = []

        async def refresh() -> None:
            async with locks.topology("b", "a"):
                await asyncio.sleep(0.05)
                engine.start_refresh("b", "a")  # a and b become one family

        async def plan(name: str) -> None:
            await asyncio.sleep(0.01)
            async with locks.plan(name, [0]) as family:
                inside.append(name)
                assert family == engine.family(name)
                await asyncio.sleep(0.02)
                inside.remove(name)

        # Both plans wait for the refresh, then hold the same (family, block 0): one at
        # a time, although they started on two different families.
        async def watch() -> None:
            for _ in range(100):
                assert len(inside) <= 1
                await asyncio.sleep(0.002)

        await asyncio.gather(refresh(), plan("a"), plan("b"), watch())
        assert engine.family("a") == engine.family("b")
        assert len(locks) == 0

    asyncio.run(scenario())
