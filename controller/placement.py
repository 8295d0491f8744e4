"""Where each memory of the engine lives: stripes over agents, in extents.

The engine names memories (`V2#3` for volume V2, `V2#3~9` for a ghost's spill
memory); the agents know extents. Placement maps one to the other through a
`Layout`: the memory's bytes are cut into stripe units dealt round-robin over
`width` agents (unit k goes to column k % width), and each column's bytes are
cut into extents of at most `extent_bytes`, so that a volume may be larger than
one file an agent's file system can hold and larger and faster than one node.
Units are whole blocks and extents whole units: a block never straddles two
agents, and a unit never straddles two extents.

Who gets what:
- a new volume's memory: the `width` registered agents that hold the fewest
  memories (ties by name), the first stripe on the next of them in turn;
  `width` is the volume's own, or the controller's `stripe_width`
  (DEFAULT_WIDTH) or the number of agents, whichever is fewer;
- a snapshot's memory: the layout of its origin's memory (`like`),
  so a copy-before-write from the origin into the snapshot stays on one agent;
- a spill memory (`V2#3~9`): the layout of the memory it spills for, likewise.

The controller stores each memory's layout in etcd, one record per memory
(`Keys.extent`), before it creates any extent, so a restarted controller finds
every extent again. Records of format 1 (one extent on one node, before
striping) still load: they are a layout of width 1 and one extent.

Only `place` chooses; `layout_of` only looks, so a read or a flush never changes
the placement.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace

from volkin.errors import FailedPrecondition, InvalidArgument, Unavailable

MiB = 1 << 20
TiB = 1 << 40
# A 1 MiB unit puts the 1 MiB requests of a sequential client at queue depth 4 on
# four different agents at once, while a 4 KiB request still touches one agent;
# larger units would keep a whole qd4 burst on one agent. A unit is never smaller
# than one block.
DEFAULT_UNIT = 1 * MiB
# Up to 8 agents: wider stripes add parallelism that one NBD client rarely uses,
# and make every flush and every snapshot's first copy touch more nodes.
DEFAULT_WIDTH = 8
# Half of ext4's largest file (16 TiB with 4 KiB blocks): an extent fits in one
# file on every file system an agent is likely to use.
DEFAULT_EXTENT_BYTES = 8 * TiB


@dataclass(frozen=True)
class ExtentRef:
    node_id: str
    extent_id: str


@dataclass(frozen=True)
class ExtentSpec:
    """One extent a layout needs: where, its id, and its size."""
    node_id: str
    extent_id: str
    size_bytes: int


@dataclass(frozen=True)
class Piece:
    """A part of a byte range of a memory that lies in one extent: `length` bytes at
    `offset` of the extent, which are bytes [at, at + length) of the range."""
    node_id: str
    extent_id: str
    offset: int
    length: int
    at: int


@dataclass(frozen=True)
class Span:
    """`length` bytes at `offset` of an extent, which are bytes [column_offset,
    column_offset + length) of stripe column `column`."""
    node_id: str
    extent_id: str
    offset: int
    length: int
    column: int
    column_offset: int


@dataclass(frozen=True)
class Layout:
    """How one memory's `size` bytes lie on agents: stripe `unit` bytes round-robin
    over `nodes` (column c on nodes[c]), each column in extents of `extent_bytes`."""
    nodes: tuple[str, ...]
    unit: int
    extent_bytes: int
    size: int
    base: str  # extent ids derive from it: `m3`, or `m3-c1-e0` when there are several

    @property
    def width(self) -> int:
        return len(self.nodes)

    def column_bytes(self, column: int) -> int:
        stride = self.unit * self.width
        rows, rest = divmod(self.size, stride)
        return rows * self.unit + min(max(rest - column * self.unit, 0), self.unit)

    def _single(self) -> bool:
        return self.width == 1 and self.size <= self.extent_bytes

    def extent_id(self, column: int, index: int) -> str:
        return self.base if self._single() else f"{self.base}-c{column}-e{index}"

    def extents(self) -> list[ExtentSpec]:
        specs = []
        for column, node in enumerate(self.nodes):
            total = self.column_bytes(column)
            for index, start in enumerate(range(0, total, self.extent_bytes)):
                specs.append(ExtentSpec(node, self.extent_id(column, index),
                                        min(self.extent_bytes, total - start)))
        return specs

    def grown(self, size: int) -> Layout:
        """The same stripes over `size` bytes (at least this layout's). A byte keeps its
        place: where it lies depends on the unit, the width and the extent size, never on
        the size, so only the last extent of each column grows and new extents follow.
        A single-extent layout whose one extent would have to split cannot grow (its
        extent's id is the bare base, the split ones' are not)."""
        if size < self.size:
            raise InvalidArgument(f"a layout only grows: {size} < {self.size} bytes")
        layout = Layout(self.nodes, self.unit, self.extent_bytes, size, self.base)
        if self._single() and not layout._single():
            raise FailedPrecondition(
                f"memory of {self.size} bytes lies in one extent of at most "
                f"{self.extent_bytes} bytes on one agent; it cannot grow to {size} bytes")
        return layout

    def pieces(self, offset: int, length: int) -> list[Piece]:
        """The extents' parts that hold [offset, offset + length) of the memory, in
        order; neighbours that are also neighbours in one extent are one piece (so a
        layout of width 1 gives one piece per extent the range touches)."""
        out: list[Piece] = []
        for piece in self._cut(offset, length):
            last = out[-1] if out else None
            if (last is not None and last.extent_id == piece.extent_id
                    and last.offset + last.length == piece.offset):
                out[-1] = Piece(last.node_id, last.extent_id, last.offset,
                                last.length + piece.length, last.at)
            else:
                out.append(piece)
        return out

    def _cut(self, offset: int, length: int) -> Iterator[Piece]:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"{length} bytes at {offset} are not inside {self.size} bytes")
        position, end = offset, offset + length
        while position < end:
            unit_index, inside = divmod(position, self.unit)
            row, column = divmod(unit_index, self.width)
            in_column = row * self.unit + inside
            index, in_extent = divmod(in_column, self.extent_bytes)
            take = min(self.unit - inside, end - position)
            yield Piece(self.nodes[column], self.extent_id(column, index), in_extent, take,
                        position - offset)
            position += take

    def spans(self, offset: int, length: int) -> list[Span]:
        """The parts of the extents that hold [offset, offset + length), each once, in no
        particular order: one per column and extent, however many units the range
        covers (a column's units in a range are contiguous in the column). For work on a
        whole range where the order of bytes does not matter: zeroing, asking for holes."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"{length} bytes at {offset} are not inside {self.size} bytes")
        if length == 0:
            return []
        end = offset + length
        first_unit, last_unit = offset // self.unit, (end - 1) // self.unit
        out = []
        for column, node in enumerate(self.nodes):
            k1 = first_unit + (column - first_unit) % self.width  # first unit of the column
            k2 = last_unit - (last_unit - column) % self.width  # last one
            if k1 > k2:
                continue
            start = (k1 // self.width) * self.unit + (offset - k1 * self.unit if k1 == first_unit
                                                       else 0)
            stop = (k2 // self.width) * self.unit + (end - k2 * self.unit if k2 == last_unit
                                                     else self.unit)
            while start < stop:
                index, inside = divmod(start, self.extent_bytes)
                take = min(stop - start, self.extent_bytes - inside)
                out.append(Span(node, self.extent_id(column, index), inside, take, column,
                                start))
                start += take
        return out

    def memory_ranges(self, column: int, start: int, length: int) -> list[tuple[int, int]]:
        """Where bytes [start, start + length) of column `column` lie in the memory, as
        (offset, length), one per stripe unit they touch."""
        out = []
        end = start + length
        while start < end:
            row, inside = divmod(start, self.unit)
            take = min(self.unit - inside, end - start)
            out.append(((row * self.width + column) * self.unit + inside, take))
            start += take
        return out

    def record(self) -> bytes:
        """The etcd record of this layout."""
        return json.dumps({"format": 2, "nodes": list(self.nodes), "unit": self.unit,
                           "extent_bytes": self.extent_bytes, "size": self.size,
                           "base": self.base}, sort_keys=True).encode()

    @staticmethod
    def from_record(raw: bytes, size: int | None = None) -> Layout:
        """The layout `record` wrote. A record of format 1 (one extent on one node,
        before striping) does not say the size: `size` does (None: a memory no volume
        uses any more, whose extent will only be deleted)."""
        found = json.loads(raw)
        if found.get("format") == 1:
            whole = 1 << 62  # one unit, one extent: the extent's id is the record's
            return Layout((str(found["node_id"]),), whole, whole,
                          whole if size is None else size, str(found["extent_id"]))
        return Layout(tuple(str(n) for n in found["nodes"]), int(found["unit"]),
                      int(found["extent_bytes"]), int(found["size"]), str(found["base"]))


class Placement:
    def __init__(self, nodes: Iterable[str] = (), unit: int = DEFAULT_UNIT,
                 width: int = DEFAULT_WIDTH, extent_bytes: int = DEFAULT_EXTENT_BYTES) -> None:
        self.nodes = sorted(nodes)  # agents that may receive new memories
        self.unit = unit  # the defaults of new volumes
        self.width = width
        self.extent_bytes = extent_bytes
        self._layouts: dict[str, Layout] = {}
        self._load: dict[str, int] = {}  # node id -> memories with a stripe there

    def update_nodes(self, nodes: Iterable[str]) -> None:
        """The agents registered now; known layouts keep their nodes."""
        self.nodes = sorted(nodes)

    def layout_of(self, memory: str) -> Layout | None:
        return self._layouts.get(memory)

    def like(self, memory: str, model: str) -> Layout | None:
        """`memory` laid out as `model` is (the same agents, unit and extents), if `model`
        has a layout: a snapshot's memory like its origin's, a spill memory like its base."""
        found = self._layouts.get(model)
        return replace(found, base=extent_id(memory)) if found else None

    def choose(self, memory: str, size: int, block_size: int, unit: int = 0,
               width: int = 0) -> Layout:
        """The layout `memory` gets when it is first placed (nothing is recorded): that
        of the memory it spills for if known, else a new stripe set of `width` agents (0:
        the default) in units of `unit` bytes (0: the default, or one block if that is
        larger)."""
        base, _, spill = memory.partition("~")
        model = self.like(memory, base) if spill else None
        if model is not None:
            return model
        unit = unit or max(self.unit, block_size)
        if unit % block_size or unit & (unit - 1):
            raise InvalidArgument(f"stripe unit {unit} must be a power of two and a multiple "
                                  f"of the block size {block_size}")
        if self.extent_bytes % unit:
            raise InvalidArgument(f"stripe unit {unit} must divide the extent size "
                                  f"{self.extent_bytes}")
        if not self.nodes:
            raise Unavailable("no agent is registered: start volkin-agent on a storage node")
        if width > len(self.nodes):
            raise FailedPrecondition(
                f"a stripe width of {width} needs {width} agents; {len(self.nodes)} "
                f"{'is' if len(self.nodes) == 1 else 'are'} registered")
        width = width or min(self.width, len(self.nodes))
        chosen = sorted(sorted(self.nodes, key=lambda n: (self._load.get(n, 0), n))[:width])
        # Each new memory starts its stripes on the next agent in turn, so that the first
        # units of every volume (partition tables, superblocks) do not all meet on one.
        turn = len(self._layouts) % width
        nodes = chosen[turn:] + chosen[:turn]
        return Layout(tuple(nodes), unit, self.extent_bytes, size, extent_id(memory))

    def place(self, memory: str, layout: Layout) -> None:
        """Records `layout` as where `memory` lives (the caller stored it in etcd)."""
        if memory in self._layouts:
            return
        self._layouts[memory] = layout
        for node in set(layout.nodes):
            self._load[node] = self._load.get(node, 0) + 1

    def grow(self, memory: str, layout: Layout) -> None:
        """Records `layout`, the same stripes as the memory's now over more bytes (the
        caller stored it in etcd)."""
        old = self._layouts[memory]
        assert (old.nodes, old.unit, old.extent_bytes, old.base) == (
            layout.nodes, layout.unit, layout.extent_bytes, layout.base), (old, layout)
        self._layouts[memory] = layout

    def forget(self, memory: str) -> Layout | None:
        layout = self._layouts.pop(memory, None)
        if layout is not None:
            for node in set(layout.nodes):
                self._load[node] -= 1
        return layout

    def nodes_of(self, memory: str) -> list[str]:
        layout = self._layouts.get(memory)
        return list(layout.nodes) if layout else []

    def memories(self) -> list[str]:
        return sorted(self._layouts)

    def load_records(self, records: dict[str, bytes],
                     size_of: Callable[[str], int | None] = lambda memory: None) -> None:
        """Memory -> record, as `Layout.record` (or the format before it) wrote them;
        `size_of` gives a memory's size for records that do not say it."""
        for memory, raw in records.items():
            self.place(memory, Layout.from_record(raw, size_of(memory)))


def single_extent_record(node_id: str, extent_id: str) -> bytes:
    """A record of format 1: one extent on one node (what placement was before striping;
    the migration of the single placement value writes these)."""
    return json.dumps({"format": 1, "node_id": node_id, "extent_id": extent_id},
                      sort_keys=True).encode()


def extent_id(memory: str) -> str:
    """An agent-safe extent id base: `V2#3` -> `m3`, `V2#3~9` -> `m3-s9` (unique ids, no
    names)."""
    base, _, spill = memory.partition("~")
    uid = base.rpartition("#")[2]
    return f"m{uid}" + (f"-s{spill}" if spill else "")
