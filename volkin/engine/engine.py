"""The map engine: the pure core that decides copies and map changes.

`MapEngine` owns a `Graph` (volumes, nodes, maps). Block operations (read,
write, background step) return a `Plan` and change nothing; the caller carries
the plan out and reports each `Commit` back through `apply`. Topology
operations (create, snapshot, refresh, resize, detach, delete) change the graph at
once: each is a single atomic change that the controller persists in one etcd
transaction, and each costs O(1) map writes whatever the volume size, except
an incremental refresh, which reads the modified maps it compares.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from volkin.engine.bitmap import SegmentedBitmap
from volkin.engine.errors import Conflict, InvalidRequest, VolumeExists, VolumeNotFound
from volkin.engine.graph import Graph, Kind, Link, Node, Volume
from volkin.engine.plan import BitChange, Commit, CopyRun, Loc, Plan
from volkin.engine.planner import PlanBuilder
from volkin.engine.records import Changes, changes


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    kind: Kind
    size_blocks: int
    block_size: int
    memory: str
    source: str | None  # the volume it still reads through, if any
    link: Link | None
    valid_blocks: int


@dataclass(frozen=True)
class RefreshStarted:
    target: str
    source: str
    incremental: bool  # True: only blocks modified on either side since they were equal
    blocks_to_copy: int


@dataclass(frozen=True)
class Deleted:
    name: str
    # Memories (extents) no node uses any more. They stay in the graph's released list
    # (and its records) until the caller, having persisted the delete, takes them
    # (`take_released`) to free them: a crash in between frees them on the next start.
    freed_memories: tuple[str, ...]


class MapEngine:
    def __init__(self, graph: Graph | None = None) -> None:
        self.graph = graph if graph is not None else Graph()

    # -- lookups -----------------------------------------------------------------
    def volume(self, name: str) -> Volume:
        try:
            return self.graph.volumes[name]
        except KeyError:
            raise VolumeNotFound(name) from None

    def volume_of_memory(self, memory: str) -> Volume:
        """The volume a memory belongs to (a spill memory: the volume it spills for)."""
        base = memory.partition("~")[0]
        volume = self.graph.volumes.get(base.rpartition("#")[0])
        if volume is None or volume.memory != base:
            raise VolumeNotFound(base)
        return volume

    def family(self, name: str) -> int:
        """The lock unit of volume `name`'s plans, with the block: (family, block). Plans
        and topology changes of different families never touch the same memory or map,
        so they may run at once; a topology change locks the families of every volume
        it names, as they are before it runs (`Graph.family`)."""
        self.volume(name)  # VolumeNotFound first
        return self.graph.family(name)

    def live_node(self, name: str) -> Node:
        return self.graph.nodes[self.volume(name).node]

    def info(self, name: str) -> VolumeInfo:
        volume = self.volume(name)
        node = self.graph.nodes[volume.node]
        return VolumeInfo(volume.name, volume.kind, volume.size_blocks, volume.block_size,
                          volume.memory, self._source_name(node), node.link,
                          self.graph.maps[node.valid].count())

    def volumes(self) -> list[VolumeInfo]:
        return [self.info(name) for name in sorted(self.graph.volumes)]

    def _source_name(self, node: Node) -> str | None:
        """The nearest live volume that `node` reads through."""
        current = node
        while current.parent is not None:
            current = self.graph.nodes[current.parent]
            if not current.is_ghost:
                return current.volume
        return None

    # -- topology ----------------------------------------------------------------
    def create_volume(self, name: str, size_blocks: int, block_size: int) -> VolumeInfo:
        self._check_new_name(name)
        if size_blocks <= 0:
            raise InvalidRequest(f"volume size must be at least one block, got {size_blocks}")
        if block_size <= 0:
            raise InvalidRequest(f"block size must be positive, got {block_size}")
        start = self.graph.tick()
        uid = self.graph.new_id()
        memory = f"{name}#{uid}"
        # A new volume's memory is a sparse extent: valid, and reading zeros.
        node = self.graph.add_node(memory, SegmentedBitmap(size_blocks, True), name)
        volume = Volume(name, uid, Kind.PRIMARY, size_blocks, block_size, memory, node.id)
        self.graph.put_volume(volume)
        self.graph.start_interval(volume, start)
        return self.info(name)

    def create_snapshot(self, source: str, name: str) -> VolumeInfo:
        """`name` becomes a PIT copy of `source` (Fig 3A): V[S] = M[S] = 0, M[source] = 0."""
        origin = self.volume(source)
        self._check_new_name(name)
        start = self.graph.tick()
        origin_node = self.graph.nodes[origin.node]
        uid = self.graph.new_id()
        memory = f"{name}#{uid}"
        node = self.graph.add_node(memory, SegmentedBitmap(origin.size_blocks, False), name)
        # Cascade: the older snapshots (and ghosts) reading through the origin now
        # read through the new snapshot, whose contents are the origin's at this
        # instant. A write to the origin then copies its block once, to the newest
        # snapshot, however many snapshots exist. Refresh targets stay where they are.
        for child_id in list(origin_node.children):
            child = self.graph.nodes[child_id]
            if child.link is Link.SNAPSHOT:
                self.graph.reparent(child, node)
        node.parent, node.link = origin_node.id, Link.SNAPSHOT
        origin_node.children.append(node.id)
        self.graph.touch_node(origin_node)
        volume = Volume(name, uid, Kind.SNAPSHOT, origin.size_blocks, origin.block_size,
                        memory, node.id)
        self.graph.put_volume(volume)
        self.graph.start_interval(origin, start)
        self.graph.start_interval(volume, start)
        self.graph.set_synced(self.graph.sync_key(origin, volume), start)
        return self.info(name)

    def start_refresh(self, target: str, source: str) -> RefreshStarted:
        """`target` becomes a PIT copy of `source` at once (Figs 3C, 3D).

        The target's old node stays as a ghost for the nodes that still read its
        old contents (the target's snapshots): those blocks are the source's
        "V = 0, M = 1". If the two volumes were equal at a recorded reference
        point (an earlier refresh or snapshot between them), only the blocks
        modified on either side since then are refreshed; otherwise all are.
        """
        dst, src = self.volume(target), self.volume(source)
        if dst.name == src.name:
            raise InvalidRequest(f"cannot refresh {target!r} from itself")
        if (dst.size_blocks, dst.block_size) != (src.size_blocks, src.block_size):
            raise Conflict(
                f"cannot refresh {target!r} ({dst.size_blocks} x {dst.block_size} B) from "
                f"{source!r} ({src.size_blocks} x {src.block_size} B): sizes differ")
        key = self.graph.sync_key(dst, src)
        since = self.graph.synced.get(key)
        start = self.graph.tick()
        old = self.graph.nodes[dst.node]
        old_valid = self.graph.maps[old.valid]
        if since is None:
            replaced = SegmentedBitmap(dst.size_blocks, True)
            valid = SegmentedBitmap(dst.size_blocks, False)
        else:
            replaced = self.graph.modified_since(src, since).combine(
                self.graph.modified_since(dst, since), "or")
            # Unreplaced blocks that the old node held are already right in place.
            valid = old_valid.combine(replaced, "andnot")
        src_node = self.graph.nodes[src.node]
        new = self.graph.add_node(dst.memory, valid, dst.name, src_node.id, Link.REFRESH)
        dst.node = new.id
        self.graph.touch_volume(dst)
        self.graph.make_ghost(old)
        self.graph.start_interval(src, start)
        self.graph.start_interval(dst, start, replaced)
        self.graph.set_synced(key, start)
        self.graph.compact_intervals(src)
        self.graph.compact_intervals(dst)
        return RefreshStarted(target, source, since is not None, dst.size_blocks - valid.count())

    def check_resize(self, name: str, size_blocks: int) -> bool:
        """Whether `resize_volume(name, size_blocks)` would grow the volume (False: it is
        that size already), raising what it would raise; changes nothing, so that the
        caller can make room for the new blocks first."""
        volume = self.volume(name)
        if size_blocks < volume.size_blocks:
            raise InvalidRequest(
                f"cannot shrink {name!r} from {volume.size_blocks} to {size_blocks} blocks: "
                f"volumes only grow")
        if size_blocks == volume.size_blocks:
            return False
        node = self.graph.nodes[volume.node]
        source = self._source_name(node)
        if node.parent is not None:
            how = (f"materialize it first (volkin snapshot materialize {name})"
                   if node.link is Link.SNAPSHOT else "wait for its refresh to finish first")
            through = repr(source) if source else "the old contents of its origin"
            raise Conflict(f"cannot resize {name!r}: it still reads blocks through "
                           f"{through}; {how}")
        readers = sorted({r for n in self.graph.nodes_of_memory(volume.memory)
                          for r in self._dependent_volumes(n)} - {name})
        if readers:
            raise Conflict(
                f"cannot resize {name!r}: {', '.join(readers)} still read blocks through it; "
                f"materialize {', '.join(readers)} first (or wait for their refresh to "
                f"finish, or delete them)")
        return True

    def resize_volume(self, name: str, size_blocks: int) -> VolumeInfo:
        """Grows `name` to `size_blocks`; the new blocks read as zeros.

        Only a volume that stands alone may grow: one that reads through nothing (not a
        virtual snapshot, not a refresh target still copying) and that nothing reads
        through (no virtual snapshot of it, no refresh from it in progress, no snapshot
        still reading its old contents after a refresh). Every map a node of such a
        volume has is then its own: the valid map grows with ones (its memory's new
        blocks are the zeros of a sparse extent, valid for it), the modified and
        replaced maps of every interval with zeros. Zeros are right for a reference
        point too: a volume it was equal to can only be refreshed incrementally from it
        once it has the same size, and its new blocks are zeros as well, so blocks
        nobody wrote since are still equal. Equal size: nothing changes. Smaller: refused
        (shrinking would drop data a file system may still use).
        """
        if not self.check_resize(name, size_blocks):
            return self.info(name)
        volume = self.volume(name)
        node = self.graph.nodes[volume.node]
        self.graph.replace_map(node.valid, self.graph.maps[node.valid].grown(size_blocks, True))
        for interval in volume.intervals:
            for map_id in (interval.modified, interval.replaced):
                if map_id is not None:
                    self.graph.replace_map(
                        map_id, self.graph.maps[map_id].grown(size_blocks, False))
        volume.size_blocks = size_blocks
        self.graph.touch_volume(volume)
        return self.info(name)

    def detach_if_real(self, name: str) -> bool:
        """Ends a background copy: once every block is in the volume's own memory it
        stops reading through its source (a snapshot becomes real, a refresh completes).
        Returns whether the volume is now independent."""
        node = self.live_node(name)
        if node.parent is None:
            return True
        if not self.graph.maps[node.valid].all():
            return False
        self.graph.detach(node)
        return True

    def delete_volume(self, name: str) -> Deleted:
        volume = self.volume(name)
        node = self.graph.nodes[volume.node]
        readers = sorted({r for n in self.graph.nodes_of_memory(volume.memory)
                          for r in self._dependent_volumes(n)} - {name})
        if readers:
            raise Conflict(
                f"cannot delete {name!r}: {', '.join(readers)} still read blocks through it; "
                f"wait for their background copy to finish (or delete them first)")
        self.graph.tick()
        # The live node first: dropping it lets ghosts that only it read go too.
        self.graph.remove_node(node)
        for ghost in self.graph.nodes_of_memory(volume.memory):
            self.graph.remove_node(ghost)  # a ghost with no readers left
        self.graph.drop_intervals(volume)
        self.graph.drop_volume(name)
        keys = self.graph.synced_with(volume.uid)
        related = {uid for key in keys for uid in key} - {volume.uid}
        for key in keys:
            self.graph.drop_synced(key)
        for uid in sorted(related):
            survivor = self.graph.volume_by_uid(uid)
            if survivor is not None:
                self.graph.compact_intervals(survivor)
        return Deleted(name, tuple(self.graph.released))

    def take_changes(self) -> Changes:
        """The records the topology operations since the last call changed, for the caller
        to persist in one transaction (and the maps those operations created, rewrote or
        dropped). Bits set by `apply` are not in it: the commits carry those."""
        return changes(self.graph, self.graph.take_touched())

    def take_released(self, only: Iterable[str] | None = None) -> list[str]:
        """Memories (extents) that no volume uses any more (those of `only`, if given);
        the caller frees them after it persisted the change that released them, and
        persists this take after it freed them."""
        return self.graph.take_released(only)

    def _dependent_volumes(self, node: Node) -> Iterator[str]:
        for child_id in node.children:
            child = self.graph.nodes[child_id]
            if child.is_ghost:
                yield from self._dependent_volumes(child)
            else:
                assert child.volume is not None
                yield child.volume

    def _check_new_name(self, name: str) -> None:
        if not name or len(name) > 128 or not all(c.isalnum() or c in "-_." for c in name):
            raise InvalidRequest(
                f"invalid volume name {name!r}: use 1-128 letters, digits, '-', '_' or '.'")
        if name in self.graph.volumes:
            raise VolumeExists(name)

    # -- block operations: plans ---------------------------------------------------
    def plan_read(self, name: str, block: int) -> Plan:
        node = self._node_for_block(name, block)
        return PlanBuilder(self.graph, block).read(node)

    def locate(self, name: str, block: int) -> Loc:
        """Where block `block` of `name` is read from now: the source of `plan_read`'s one
        Read step, without building the plan (the data path's fast path for reads)."""
        return PlanBuilder(self.graph, block).resolve(self._node_for_block(name, block))

    def plan_write(self, name: str, block: int, whole_block: bool = False) -> Plan:
        node = self._node_for_block(name, block)
        return PlanBuilder(self.graph, block).write(self.volume(name), node, whole_block)

    def plan_background(self, name: str, block: int) -> Plan:
        """One step of a background copy (Fig 7): make block `block` of `name` real."""
        node = self._node_for_block(name, block)
        return PlanBuilder(self.graph, block).background(node)

    def blocks_to_copy(self, name: str, start: int = 0) -> Iterator[int]:
        """Blocks of `name` that still read through another volume, in order."""
        node = self.live_node(name)
        if node.parent is None:
            return iter(())
        return self.graph.maps[node.valid].iter_zeros(start)

    def locate_run(self, name: str, first: int, count: int) -> Loc | None:
        """Where blocks [first, first + count) of `name` are read from now, if they all
        resolve through one node (to consecutive blocks of its memory, from
        Loc(memory, first)); None if they resolve to different memories. `locate` for a
        range, segment by segment."""
        node = self.live_node(name)
        stop = first + count
        for _ in range(256):
            held = self.graph.maps[node.valid].uniform(first, stop)
            if held is None:
                return None
            if held:
                return Loc(node.memory, first)
            if node.parent is None:
                return None
            node = self.graph.nodes[node.parent]
        return None

    def own_run(self, name: str, first: int, count: int) -> bool | None:
        """Whether blocks [first, first + count) of `name` are all its own (True), none of
        them (False), or some (None); segment by segment, not block by block."""
        node = self.live_node(name)
        if node.parent is None:
            return True
        return self.graph.maps[node.valid].uniform(first, first + count)

    def plan_background_run(self, name: str, first: int, count: int) -> CopyRun | None:
        """The background copy of blocks [first, first + count) of `name` as one run, if
        each of them would get the same plan from `plan_background`: not yet the volume's
        own, held by no other node of its memory (nothing to evict), and resolving to one
        memory other than its own through the same ancestor. Else None (copy them block by
        block). Costs a few operations per map segment, not per block."""
        volume = self.volume(name)
        if count <= 0 or first < 0 or first + count > volume.size_blocks:
            raise InvalidRequest(f"blocks [{first}, {first + count}) are not inside volume "
                                 f"{name!r} (0..{volume.size_blocks - 1})")
        node = self.graph.nodes[volume.node]
        stop = first + count
        if node.parent is None or self.graph.maps[node.valid].uniform(first, stop) is not False:
            return None
        for other in self.graph.nodes_of_memory(node.memory):
            if other.id != node.id and self.graph.maps[other.valid].uniform(
                    first, stop) is not False:
                return None
        # None of them is its own: they resolve through its ancestors, alike or not.
        source = self.locate_run(name, first, count)
        if source is None or source.memory == node.memory:
            return None  # several memories, or a ghost's (the planner only sets the bit)
        return CopyRun(source, Loc(node.memory, first), count,
                       Commit((BitChange(node.valid, first, True, count),)))

    def apply(self, commit: Commit) -> None:
        """Records a commit that the caller has made durable."""
        for change in commit.changes:
            if change.count == 1:
                self.graph.maps[change.map_id].set(change.block, change.value)
            else:
                self.graph.maps[change.map_id].set_range(change.block,
                                                         change.block + change.count,
                                                         change.value)

    def _node_for_block(self, name: str, block: int) -> Node:
        volume = self.volume(name)
        if not 0 <= block < volume.size_blocks:
            raise InvalidRequest(
                f"block {block} is outside volume {name!r} (0..{volume.size_blocks - 1})")
        return self.graph.nodes[volume.node]
