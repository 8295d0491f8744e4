"""The volume graph: which node reads through which, and which maps each one owns.

A *node* is one incarnation of a volume's contents. Each user-visible volume
has exactly one **live** node. A refresh replaces the target's live node with a
fresh one that reads through the source; the old node stays behind as a
**ghost** while other nodes (the target's snapshots) still need the old data it
holds in the shared memory. That ghost is what the source calls "V_n = 0 and
M_n = 1 in VM map 34": memory 24 holds data that is no longer V2's but is
still S2's.

Each node has a *valid* map (the V bits): bit n set means the node's memory
holds the node's contents of block n. A node whose bit is clear reads block n
through its parent. Several nodes may share one memory (a live node and the
ghosts of earlier incarnations); two of them are valid at the same block only
when they hold the same data there, and whoever overwrites that block first
pushes it to whatever still reads it (eviction, see `planner`).

Each volume has *modified* maps (the M bits): one per interval between
reference points (snapshot creation, refresh start). A write sets the bit in
the newest interval only, so a write costs one bit however many snapshots
exist, and "modified since reference point e" is the union of the intervals
from e on. A refresh also records, per interval, which blocks it replaced, so
that older reference points stay truthful.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from volkin.engine.bitmap import SegmentedBitmap


class Link(Enum):
    """How a node came to read through its parent."""

    SNAPSHOT = "snapshot"  # a PIT snapshot of the parent (older snapshots cascade under newer)
    REFRESH = "refresh"  # a refresh target copying the parent


class Kind(Enum):
    PRIMARY = "primary"
    SNAPSHOT = "snapshot"


@dataclass
class Node:
    id: int
    memory: str
    valid: str  # map id of the node's V bits
    parent: int | None = None
    link: Link | None = None
    volume: str | None = None  # None: a ghost, kept only for the nodes that read through it
    children: list[int] = field(default_factory=list)
    spill: bool = False  # a ghost's spill node (see `Graph.make_ghost`)

    @property
    def is_ghost(self) -> bool:
        return self.volume is None


@dataclass(frozen=True)
class Interval:
    """Blocks modified from reference point `start` until the next interval starts."""

    start: int
    modified: str  # map id: blocks written during the interval
    replaced: str | None = None  # map id: blocks a refresh replaced at `start`, if one did


@dataclass
class Volume:
    name: str
    uid: int
    kind: Kind
    size_blocks: int
    block_size: int
    memory: str
    node: int  # the live node
    intervals: list[Interval] = field(default_factory=list)


@dataclass
class Touched:
    """What topology changes touched since the caller last took them (`Graph.take_touched`).

    Each entry names a record that may have changed or gone; the records themselves
    are read from the graph when the caller takes them (`persist.changes`), so a
    record touched twice is written once, with its final value. `maps` are maps whose
    size, default or contents a topology change set (creating, merging or dropping
    them); bits set by plans' commits are not here: the commits carry those.
    """

    engine: bool = False  # the clock or the id counter moved
    volumes: set[str] = field(default_factory=set)
    nodes: set[int] = field(default_factory=set)
    maps: set[str] = field(default_factory=set)
    synced: set[tuple[int, int]] = field(default_factory=set)
    released: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.engine or self.volumes or self.nodes or self.maps or self.synced
                    or self.released)


@dataclass
class Graph:
    """Everything the engine knows: nodes, volumes, maps and reference points.

    Every change to the graph's records goes through a method here or names what it
    changed in `touched`, so that the caller can persist exactly those records.
    """

    clock: int = 0  # logical time; advances at every topology change
    next_id: int = 1
    nodes: dict[int, Node] = field(default_factory=dict)
    volumes: dict[str, Volume] = field(default_factory=dict)
    maps: dict[str, SegmentedBitmap] = field(default_factory=dict)
    # (uid, uid) sorted -> reference point at which both volumes had equal contents.
    synced: dict[tuple[int, int], int] = field(default_factory=dict)
    # memory -> ids of the nodes sharing it (one live node, any number of ghosts).
    by_memory: dict[str, list[int]] = field(default_factory=dict)
    # Memories no node uses any more, for the caller to free (`take_released`).
    released: list[str] = field(default_factory=list)
    touched: Touched = field(default_factory=Touched)
    # Bumped by every change to which node reads through which, or which volume is
    # which node: what families are made of (`family`).
    generation: int = 0
    _families: dict[str, int] = field(default_factory=dict)
    _families_generation: int = -1
    # Indexes built on first use (loading fills the dicts above directly) and kept by
    # the methods that change what they index: a delete must not walk every volume.
    _synced_by_uid: dict[int, set[tuple[int, int]]] | None = None
    _volume_by_uid: dict[int, str] | None = None

    def synced_with(self, uid: int) -> set[tuple[int, int]]:
        """The reference-point keys that name volume `uid`."""
        if self._synced_by_uid is None:
            self._synced_by_uid = {}
            for key in self.synced:
                for one in key:
                    self._synced_by_uid.setdefault(one, set()).add(key)
        return set(self._synced_by_uid.get(uid, ()))

    def volume_by_uid(self, uid: int) -> Volume | None:
        if self._volume_by_uid is None:
            self._volume_by_uid = {v.uid: v.name for v in self.volumes.values()}
        name = self._volume_by_uid.get(uid)
        return self.volumes.get(name) if name is not None else None

    def family(self, name: str) -> int:
        """The family of volume `name`: the smallest node id among the nodes connected
        to its live node by reading through one another or by sharing a memory. Plans
        and topology changes of different families never touch the same memory or map.
        The id holds until the next topology change of that family."""
        if self._families_generation != self.generation:
            self._families = {}
            self._families_generation = self.generation
        found = self._families.get(name)
        if found is None:
            members = self._component(self.volumes[name].node)
            found = min(members)
            for node_id in members:
                volume = self.nodes[node_id].volume
                if volume is not None:
                    self._families[volume] = found
        return found

    def _component(self, start: int) -> set[int]:
        seen = {start}
        todo = [start]
        while todo:
            node = self.nodes[todo.pop()]
            around = [*node.children, *self.by_memory.get(node.memory, ())]
            if node.parent is not None:
                around.append(node.parent)
            for other in around:
                if other not in seen:
                    seen.add(other)
                    todo.append(other)
        return seen

    def take_touched(self) -> Touched:
        touched, self.touched = self.touched, Touched()
        return touched

    def new_id(self) -> int:
        value = self.next_id
        self.next_id += 1
        self.touched.engine = True
        return value

    def tick(self) -> int:
        self.clock += 1
        self.touched.engine = True
        return self.clock

    def add_map(self, map_id: str, bitmap: SegmentedBitmap) -> str:
        self.maps[map_id] = bitmap
        self.touched.maps.add(map_id)
        return map_id

    def replace_map(self, map_id: str, bitmap: SegmentedBitmap) -> None:
        self.maps[map_id] = bitmap
        self.touched.maps.add(map_id)

    def drop_map(self, map_id: str) -> None:
        del self.maps[map_id]
        self.touched.maps.add(map_id)

    def put_volume(self, volume: Volume) -> None:
        self.volumes[volume.name] = volume
        if self._volume_by_uid is not None:
            self._volume_by_uid[volume.uid] = volume.name
        self.touched.volumes.add(volume.name)
        self.generation += 1

    def drop_volume(self, name: str) -> None:
        volume = self.volumes.pop(name)
        if self._volume_by_uid is not None:
            self._volume_by_uid.pop(volume.uid, None)
        self.touched.volumes.add(name)
        self.generation += 1

    def touch_volume(self, volume: Volume) -> None:
        self.touched.volumes.add(volume.name)
        self.generation += 1

    def touch_node(self, node: Node) -> None:
        self.touched.nodes.add(node.id)
        self.generation += 1

    def set_synced(self, key: tuple[int, int], start: int) -> None:
        self.synced[key] = start
        self.touched.synced.add(key)
        if self._synced_by_uid is not None:
            for one in key:
                self._synced_by_uid.setdefault(one, set()).add(key)

    def drop_synced(self, key: tuple[int, int]) -> None:
        del self.synced[key]
        self.touched.synced.add(key)
        if self._synced_by_uid is not None:
            for one in key:
                self._synced_by_uid.get(one, set()).discard(key)

    def take_released(self, only: Iterable[str] | None = None) -> list[str]:
        """Takes the released memories (those of `only`, if given) off the list."""
        if only is None:
            taken, self.released = self.released, []
        else:
            wanted = set(only)
            taken = [m for m in self.released if m in wanted]
            self.released = [m for m in self.released if m not in wanted]
        self.touched.released.update(taken)
        return taken

    def add_node(self, memory: str, valid: SegmentedBitmap, volume: str | None,
                 parent: int | None = None, link: Link | None = None) -> Node:
        node_id = self.new_id()
        node = Node(node_id, memory, self.add_map(f"valid/{node_id}", valid),
                    parent=parent, link=link, volume=volume)
        self.nodes[node_id] = node
        self.touched.nodes.add(node_id)
        self.generation += 1
        self.by_memory.setdefault(memory, []).append(node_id)
        if parent is not None:
            self.nodes[parent].children.append(node_id)
            self.touched.nodes.add(parent)
        return node

    def nodes_of_memory(self, memory: str) -> list[Node]:
        return [self.nodes[i] for i in self.by_memory.get(memory, ())]

    def reparent(self, child: Node, parent: Node) -> None:
        if child.parent is not None:
            self.nodes[child.parent].children.remove(child.id)
            self.touched.nodes.add(child.parent)
        child.parent = parent.id
        parent.children.append(child.id)
        self.touched.nodes.update((child.id, parent.id))
        self.generation += 1

    def detach(self, node: Node) -> None:
        """Stops `node` reading through its parent; drops ghosts nobody reads any more."""
        parent_id = node.parent
        node.parent = None
        node.link = None
        self.touched.nodes.add(node.id)
        self.generation += 1
        if parent_id is not None:
            parent = self.nodes[parent_id]
            parent.children.remove(node.id)
            self.touched.nodes.add(parent_id)
            self.drop_if_unused(parent)

    def drop_if_unused(self, node: Node) -> None:
        if node.is_ghost and not node.children:
            self.remove_node(node)

    def remove_node(self, node: Node) -> None:
        if node.children:
            raise AssertionError(f"node {node.id} still has children {node.children}")
        del self.nodes[node.id]
        self.touched.nodes.add(node.id)
        self.generation += 1
        self.drop_map(node.valid)
        sharing = self.by_memory[node.memory]
        sharing.remove(node.id)
        if not sharing:
            del self.by_memory[node.memory]
            self.released.append(node.memory)
            self.touched.released.add(node.memory)
        self.detach(node)

    def make_ghost(self, node: Node) -> None:
        """Turns a volume's old node into a ghost, or drops it if nothing reads through it.

        A ghost gets one child of its own, a *spill* node with a memory of its
        own, and the ghost's readers move under it. The spill is empty and
        costs nothing until a cycle needs it: when two memories each hold the
        other's readers' data (volumes refreshed from each other's old
        contents), neither block can be pushed into its readers' memory
        before the other is, and the spill is the third place a swap needs.
        """
        node.volume = None
        self.touched.nodes.add(node.id)
        self.generation += 1
        if not node.children:
            self.remove_node(node)
            return
        spill = self.add_node(f"{node.memory}~{self.next_id}", SegmentedBitmap(
            self.maps[node.valid].size, False), None, parent=node.id)
        spill.spill = True
        for child_id in list(node.children):
            if child_id != spill.id:
                self.reparent(self.nodes[child_id], spill)

    def spill_of(self, ghost: Node) -> Node:
        for child_id in ghost.children:
            if self.nodes[child_id].spill:
                return self.nodes[child_id]
        raise AssertionError(f"ghost node {ghost.id} has no spill node")

    def sync_key(self, a: Volume, b: Volume) -> tuple[int, int]:
        return (min(a.uid, b.uid), max(a.uid, b.uid))

    def start_interval(self, volume: Volume, start: int,
                       replaced: SegmentedBitmap | None = None) -> None:
        modified = self.add_map(f"modified/{volume.uid}/{start}",
                                SegmentedBitmap(volume.size_blocks))
        replaced_id = None
        if replaced is not None:
            replaced_id = self.add_map(f"replaced/{volume.uid}/{start}", replaced)
        volume.intervals.append(Interval(start, modified, replaced_id))
        self.touched.volumes.add(volume.name)

    def modified_since(self, volume: Volume, start: int) -> SegmentedBitmap:
        """Blocks whose contents may have changed after reference point `start`.

        Writes from `start` on count; a refresh replacement counts only if it
        happened after `start` (the one *at* `start` is what made the two
        volumes equal).
        """
        result = SegmentedBitmap(volume.size_blocks)
        for interval in volume.intervals:
            if interval.start >= start:
                result = result.combine(self.maps[interval.modified], "or")
            if interval.start > start and interval.replaced is not None:
                result = result.combine(self.maps[interval.replaced], "or")
        return result

    def compact_intervals(self, volume: Volume) -> None:
        """Keeps only the intervals that a recorded reference point or the next write needs.

        Intervals before the oldest reference point of `volume` are dropped. An
        interval that starts at no reference point is folded into the one before
        it; its replaced blocks become modified blocks there, because for the
        earlier reference point they are changes that happened after it.
        """
        references = {self.synced[key] for key in self.synced_with(volume.uid)}
        newest = volume.intervals[-1]
        kept: list[Interval] = []
        for interval in volume.intervals:
            if interval.start in references or interval is newest:
                kept.append(interval)
                continue
            if kept:
                target = self.maps[kept[-1].modified]
                merged = target.combine(self.maps[interval.modified], "or")
                if interval.replaced is not None:
                    merged = merged.combine(self.maps[interval.replaced], "or")
                self.replace_map(kept[-1].modified, merged)
            self._drop_interval_maps(interval)
        if len(kept) != len(volume.intervals):
            self.touched.volumes.add(volume.name)
        volume.intervals = kept

    def drop_intervals(self, volume: Volume) -> None:
        for interval in volume.intervals:
            self._drop_interval_maps(interval)
        volume.intervals = []
        self.touched.volumes.add(volume.name)

    def _drop_interval_maps(self, interval: Interval) -> None:
        self.drop_map(interval.modified)
        if interval.replaced is not None:
            self.drop_map(interval.replaced)
