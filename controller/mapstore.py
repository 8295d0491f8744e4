"""The engine's maps in etcd: the store that makes a plan's `Commit` durable.

Keys (`volkin.keys.Keys`):

    topology                 JSON: volumes, nodes, intervals, reference points, and
                             every map's size and default
    map_segment(map, n)      zlib of one 4 KiB segment of a map; an absent key is
                             the map's default

A snapshot or a refresh start writes the topology key and no segment (new maps
start at their default), whatever the volume size. A commit writes only the
segments its bits fall in. Every write is one etcd transaction guarded by the
term's fence (`controller.guarded`): a deposed controller cannot change a map,
however late its transaction arrives.

`GroupCommit` batches the commits of concurrent plans: while one transaction is
in flight, the commits that arrive queue up and the next transaction carries
them all. A commit is applied to the engine only after its transaction
succeeded. A transaction etcd did not answer is sent again unchanged until it
does (`GuardedEtcd`), so a change etcd applied is never reverted by a later
commit computed from a view that missed it; if it can never be confirmed, the
term ends and the next one reloads the maps from etcd.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence

from controller.batching import Batcher
from controller.guarded import GuardedEtcd
from volkin.engine import Commit, MapEngine
from volkin.engine.bitmap import SEGMENT_BITS, SegmentedBitmap
from volkin.engine.persist import EngineState, dump, load
from volkin.keys import Keys


class MapStore:
    def __init__(self, etcd: GuardedEtcd, keys: Keys) -> None:
        self._etcd = etcd
        self._keys = keys
        # What etcd holds, as last written or read: topology JSON and segment bytes.
        self._topology = b""
        self._segments: dict[tuple[str, int], bytes] = {}
        self.transactions = 0  # transactions sent, for tests and metrics

    # -- keys ------------------------------------------------------------------
    @property
    def topology_key(self) -> str:
        return self._keys.topology

    def segment_key(self, map_id: str, segment: int) -> str:
        return self._keys.map_segment(map_id, segment)

    # -- load ------------------------------------------------------------------
    async def load(self) -> MapEngine:
        """The engine as etcd holds it (an empty one if nothing was ever stored)."""
        raw = await self._etcd.etcd.get(self.topology_key)
        stored = await self._etcd.etcd.get_prefix(self._keys.maps)
        if raw is None:
            self._topology, self._segments = b"", {}
            return MapEngine()
        record = json.loads(raw)
        state = EngineState(record["topology"],
                            {m: (size, default) for m, (size, default) in record["maps"].items()})
        segments = {}
        for key, value in stored.items():
            map_id, _, index = key[len(self._keys.maps):].rpartition("/")
            data = zlib.decompress(value)
            state.segments[(map_id, int(index))] = data
            segments[(map_id, int(index))] = data
        engine = load(state)
        self._topology, self._segments = raw, segments
        return engine

    # -- writes ----------------------------------------------------------------
    async def save(self, engine: MapEngine) -> None:
        """Stores the engine after a topology operation: the topology and whatever
        segments differ from what etcd holds, in one transaction."""
        state = dump(engine)
        topology = json.dumps({"topology": state.topology, "maps": state.maps},
                              sort_keys=True).encode()
        put = {self.segment_key(m, i): zlib.compress(data, 1)
               for (m, i), data in state.segments.items() if self._segments.get((m, i)) != data}
        delete = [self.segment_key(m, i) for (m, i) in self._segments
                  if (m, i) not in state.segments]
        if topology != self._topology:
            put[self.topology_key] = topology
        await self._transact(put, delete)
        self._topology, self._segments = topology, dict(state.segments)

    async def commit(self, engine: MapEngine, commits: Sequence[Commit]) -> None:
        """Makes several plans' commits durable in one transaction, then applies them."""
        touched: dict[tuple[str, int], SegmentedBitmap] = {}
        for commit in commits:
            for change in commit.changes:
                index = change.block // SEGMENT_BITS
                key = (change.map_id, index)
                if key not in touched:
                    current = engine.graph.maps[change.map_id]
                    scratch = SegmentedBitmap(current.size, current.default)
                    scratch.load_segment(index, current.segment_bytes(index))
                    touched[key] = scratch
                touched[key].set(change.block, change.value)
        put: dict[str, bytes] = {}
        delete: list[str] = []
        for (map_id, index), scratch in touched.items():
            data = scratch.segment_bytes(index)
            if scratch.stored_segments() == 0:  # back to the default: the key goes
                if (map_id, index) in self._segments:
                    delete.append(self.segment_key(map_id, index))
            elif self._segments.get((map_id, index)) != data:
                put[self.segment_key(map_id, index)] = zlib.compress(data, 1)
        await self._transact(put, delete)
        for (map_id, index), scratch in touched.items():
            if scratch.stored_segments() == 0:
                self._segments.pop((map_id, index), None)
            else:
                self._segments[(map_id, index)] = scratch.segment_bytes(index)
        for commit in commits:
            engine.apply(commit)

    async def _transact(self, put: dict[str, bytes], delete: list[str]) -> None:
        if not put and not delete:
            return
        self.transactions += 1
        await self._etcd.txn(put, delete)


class GroupCommit:
    """Carries the commits of concurrent plans to etcd, as few transactions as possible."""

    def __init__(self, store: MapStore, engine: MapEngine) -> None:
        self._store = store
        self._engine = engine
        self._batcher: Batcher[None, Commit] = Batcher(self._send)

    async def commit(self, commit: Commit) -> None:
        """Returns once `commit` is in etcd and applied to the engine; raises if not."""
        await self._batcher.submit(None, commit)

    async def _send(self, _: None, commits: list[Commit]) -> None:
        await self._store.commit(self._engine, commits)
