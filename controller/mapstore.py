"""The engine's records and maps in etcd: what makes a topology change and a `Commit` durable.

Keys (`volkin.keys.Keys`, listed in docs/etcd-keys.md):

    layout                   {"layout": 2}: this prefix holds one record per thing
    record(kind, name)       one JSON record per volume, node, map, reference point,
                             released memory, and the engine's clock (engine/records.py)
    map_segment(map, n)      zlib of one 4 KiB segment of a map; an absent key is the
                             map's default

A topology change writes the records it touched and the segments of the maps it
created, rewrote or dropped (`MapEngine.take_changes`): a snapshot or a refresh
start writes a handful of keys and no segment, whatever the volume size and
however many volumes exist. A commit writes only the segments its bits fall in.
Every write is one etcd transaction guarded by the term's fence
(`controller.guarded`): a deposed controller cannot change anything, however late
its transaction arrives.

Topology changes of different families run at once, so their changes are taken
from the engine with a ticket (`take`, synchronous, right after the engine
changed) and written in ticket order (`write`): a later change of a record shared
by all of them (the engine's clock) never lands before an earlier one.

`GroupCommit` batches the commits of concurrent plans: while one transaction is
in flight, the commits that arrive queue up and the next transaction carries
them all. A commit is applied to the engine only after its transaction
succeeded. A transaction etcd did not answer is sent again unchanged until it
does (`GuardedEtcd`), so a change etcd applied is never reverted by a later
commit computed from a view that missed it; if it can never be confirmed, the
term ends and the next one reloads everything from etcd.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from controller.batching import Batcher
from controller.guarded import GuardedEtcd
from controller.metrics import CommitMetrics
from volkin.engine import Changes, Commit, MapEngine
from volkin.engine import records as rec
from volkin.engine.bitmap import SEGMENT_BITS, SegmentedBitmap
from volkin.errors import FailedPrecondition
from volkin.keys import Keys

LAYOUT = 2
RECORD_KINDS = ("engine", "volume", "node", "map", "synced", "released")


class LayoutError(FailedPrecondition):
    """etcd holds volumes in a layout this controller cannot read: it must not serve."""


@dataclass(frozen=True)
class Pending:
    """A topology change taken from the engine, to be stored in its turn."""

    changes: Changes
    ticket: int


# Segments one transaction of commits writes at most: etcd takes 128 operations per
# transaction by default, and the guard adds its own.
TXN_SEGMENTS = 100


class MapStore:
    def __init__(self, etcd: GuardedEtcd, keys: Keys,
                 metrics: CommitMetrics | None = None) -> None:
        self._etcd = etcd
        self._keys = keys
        self.metrics = metrics or CommitMetrics()
        # What etcd holds, as last written or read: segment bytes, and per map its
        # stored segment indexes.
        self._segments: dict[tuple[str, int], bytes] = {}
        self._map_segments: dict[str, set[int]] = {}
        self._layout_stored = False
        self._tickets = 0
        self._turn = 0
        self._turns: asyncio.Condition | None = None
        self.transactions = 0  # transactions sent, for tests and metrics

    # -- keys ------------------------------------------------------------------
    def segment_key(self, map_id: str, segment: int) -> str:
        return self._keys.map_segment(map_id, segment)

    # -- load ------------------------------------------------------------------
    async def load(self) -> MapEngine:
        """The engine as etcd holds it (an empty one if nothing was ever stored)."""
        raw = self._etcd.etcd
        layout = await raw.get(self._keys.layout)
        if layout is None:
            if await raw.get(self._keys.topology) is not None:
                raise LayoutError(
                    f"etcd under {self._keys.prefix} holds volumes in the previous layout "
                    f"({self._keys.topology}); a controller migrates them when it takes over")
        else:
            version = int(json.loads(layout).get("layout", 0))
            if version != LAYOUT:
                raise LayoutError(
                    f"etcd under {self._keys.prefix} holds layout {version}; this controller "
                    f"reads layout {LAYOUT}: run the volkin version that wrote it, or newer")
            self._layout_stored = True
        stored: dict[rec.RecordKey, rec.Record] = {}
        for kind in RECORD_KINDS:
            prefix = self._keys.record_prefix(kind)
            if prefix.endswith("/"):
                found = await raw.get_prefix(prefix)
            else:
                one = await raw.get(prefix)
                found = {prefix: one} if one is not None else {}
            for key, value in found.items():
                named = self._keys.record_of(key)
                if named is not None:
                    stored[named] = json.loads(value)
        segments: dict[tuple[str, int], bytes] = {}
        for key, value in (await raw.get_prefix(self._keys.maps)).items():
            map_id, _, index = key[len(self._keys.maps):].rpartition("/")
            segments[(map_id, int(index))] = zlib.decompress(value)
        graph = rec.load(stored, segments)
        self._segments = {k: v for k, v in segments.items() if k[0] in graph.maps}
        self._map_segments = {}
        for map_id, segment in self._segments:
            self._map_segments.setdefault(map_id, set()).add(segment)
        return MapEngine(graph)

    # -- topology changes --------------------------------------------------------
    def take(self, engine: MapEngine) -> Pending:
        """What the engine changed since the last take, with its turn to be written.
        Call it right after the change, with no await in between."""
        pending = Pending(engine.take_changes(), self._tickets)
        self._tickets += 1
        return pending

    async def write(self, pending: Pending, put: Mapping[str, bytes] | None = None,
                    delete: Sequence[str] = (), skip: bool = False) -> None:
        """Stores a taken change, with any other keys the same change needs (`put`,
        `delete`, e.g. a job record), in one transaction, in its turn. With `skip`, only
        gives up the turn (a change taken back before it was stored)."""
        if self._turns is None:
            self._turns = asyncio.Condition()
        async with self._turns:
            await self._turns.wait_for(lambda: self._turn == pending.ticket)
        try:
            if not skip:
                await self._write(pending.changes, put or {}, delete)
        finally:
            async with self._turns:
                self._turn += 1
                self._turns.notify_all()

    @property
    def etcd_full(self) -> bool:
        """etcd refused the last transaction for want of space."""
        return self._etcd.full

    async def probe_space(self) -> None:
        """Raises `EtcdFull` if etcd still refuses writes (a write of a value it holds)."""
        await self._transact({self._keys.layout: json.dumps({"layout": LAYOUT}).encode()}, [])

    async def put(self, key: str, value: bytes) -> None:
        """One more key, guarded like everything else (a memory's placement record)."""
        await self._transact({key: value}, [])

    async def save(self, engine: MapEngine, put: Mapping[str, bytes] | None = None,
                   delete: Sequence[str] = ()) -> None:
        """`take` and `write` at once."""
        await self.write(self.take(engine), put, delete)

    async def _write(self, changes: Changes, extra_put: Mapping[str, bytes],
                     extra_delete: Sequence[str]) -> None:
        put: dict[str, bytes] = dict(extra_put)
        delete: list[str] = list(extra_delete)
        for (kind, name), record in changes.records.items():
            key = self._keys.record(kind, name)
            if record is None:
                delete.append(key)
            else:
                put[key] = json.dumps(record, sort_keys=True).encode()
        segments_after: dict[str, dict[int, bytes]] = {}
        # The segments of a map the change dropped go after it, in transactions of their
        # own: no record names the map any more (a crash in between leaves keys that
        # `load` ignores, and map ids are never used again), and a dropped map of a large
        # volume has more segments than etcd takes in one transaction.
        garbage: list[str] = []
        for map_id, segments in changes.maps.items():
            now = dict(segments or ())
            segments_after[map_id] = now
            for index, data in now.items():
                if self._segments.get((map_id, index)) != data:
                    put[self.segment_key(map_id, index)] = zlib.compress(data, 1)
            for index in self._map_segments.get(map_id, set()) - set(now):
                (garbage if segments is None else delete).append(
                    self.segment_key(map_id, index))
        if not self._layout_stored and (put or delete):
            put[self._keys.layout] = json.dumps({"layout": LAYOUT}).encode()
        await self._transact(put, delete)
        self._layout_stored = True
        for start in range(0, len(garbage), TXN_SEGMENTS):
            await self._transact({}, garbage[start:start + TXN_SEGMENTS])
        for map_id, now in segments_after.items():
            for index in self._map_segments.pop(map_id, set()):
                self._segments.pop((map_id, index), None)
            for index, data in now.items():
                self._segments[(map_id, index)] = data
            if now:
                self._map_segments[map_id] = set(now)

    async def commit(self, engine: MapEngine, commits: Sequence[Commit]) -> None:
        """Makes several plans' commits durable in as few transactions as etcd takes (at
        most TXN_SEGMENTS segments each; one commit is never split), then applies them."""
        try:
            await self._commit(engine, commits)
        except Exception:
            self.metrics.failed.inc(len(commits))  # each of their plans stops (Batcher)
            raise
        self.metrics.committed(len(commits))

    async def _commit(self, engine: MapEngine, commits: Sequence[Commit]) -> None:
        group: list[Commit] = []
        segments: set[tuple[str, int]] = set()
        for commit in commits:
            mine = {(change.map_id, index) for change in commit.changes
                    for index in range(change.block // SEGMENT_BITS,
                                       -(-(change.block + change.count) // SEGMENT_BITS))}
            if group and len(segments | mine) > TXN_SEGMENTS:
                await self._commit_group(engine, group)
                group, segments = [], set()
            group.append(commit)
            segments |= mine
        if group:
            await self._commit_group(engine, group)

    async def _commit_group(self, engine: MapEngine, commits: Sequence[Commit]) -> None:
        touched: dict[tuple[str, int], SegmentedBitmap] = {}
        for commit in commits:
            for change in commit.changes:
                stop = change.block + change.count  # a run's change spans segments
                for index in range(change.block // SEGMENT_BITS, -(-stop // SEGMENT_BITS)):
                    key = (change.map_id, index)
                    if key not in touched:
                        current = engine.graph.maps[change.map_id]
                        scratch = SegmentedBitmap(current.size, current.default)
                        scratch.load_segment(index, current.segment_bytes(index))
                        touched[key] = scratch
                    base = index * SEGMENT_BITS
                    touched[key].set_range(max(change.block, base),
                                           min(stop, base + SEGMENT_BITS), change.value)
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
                self._map_segments.get(map_id, set()).discard(index)
            else:
                self._segments[(map_id, index)] = scratch.segment_bytes(index)
                self._map_segments.setdefault(map_id, set()).add(index)
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
