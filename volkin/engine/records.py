"""The graph as small records, and the changes a topology operation made to them.

A controller keeps one record per thing in etcd, so that a topology operation
writes the few records it touched (raft's `Ready`: the engine says what to
persist, the caller persists it) and a start reads records in proportion to
what exists:

    ("engine", "")          the logical clock and the id counter
    ("volume", name)        a volume: uid, kind, size, memory, live node, intervals
    ("node", id)            a node: memory, valid map, parent, link, volume, children
    ("map", map id)         a map's size and default; its bits are stored as segments
    ("synced", "a-b")       the reference point at which volumes a and b were equal
    ("released", memory)    a memory no node uses, until the caller freed its extent

Every record carries `"format": FORMAT`. `changes` turns what the graph touched
(`Graph.take_touched`) into a frozen `Changes`: each touched record with its
current value, or None when it no longer exists, and for each map a topology
operation created, rewrote or dropped, its non-default segments (None: dropped).
`load` rebuilds an engine from records and segments alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from volkin.engine.bitmap import SegmentedBitmap
from volkin.engine.graph import Graph, Interval, Kind, Link, Node, Touched, Volume

FORMAT = 1
RecordKey = tuple[str, str]
Record = Mapping[str, Any]


@dataclass(frozen=True)
class Changes:
    """What to persist after a topology operation, in one transaction."""

    records: Mapping[RecordKey, Record | None]  # None: delete the record
    # Map id -> its stored (non-default) segments, all of them; None: the map is gone.
    maps: Mapping[str, tuple[tuple[int, bytes], ...] | None]

    def __bool__(self) -> bool:
        return bool(self.records or self.maps)


def changes(graph: Graph, touched: Touched) -> Changes:
    out: dict[RecordKey, Record | None] = {}
    if touched.engine:
        out[("engine", "")] = _engine(graph)
    for name in touched.volumes:
        volume = graph.volumes.get(name)
        out[("volume", name)] = _volume(volume) if volume is not None else None
    for node_id in touched.nodes:
        node = graph.nodes.get(node_id)
        out[("node", str(node_id))] = _node(node) if node is not None else None
    maps: dict[str, tuple[tuple[int, bytes], ...] | None] = {}
    for map_id in touched.maps:
        bitmap = graph.maps.get(map_id)
        out[("map", map_id)] = _map(bitmap) if bitmap is not None else None
        maps[map_id] = tuple(bitmap.segments()) if bitmap is not None else None
    for key in touched.synced:
        start = graph.synced.get(key)
        out[("synced", _pair(key))] = {"format": FORMAT, "start": start} if start is not None \
            else None
    released = set(graph.released)
    for memory in touched.released:
        out[("released", memory)] = {"format": FORMAT} if memory in released else None
    return Changes(out, maps)


def records(graph: Graph) -> dict[RecordKey, Record]:
    """Every record of the graph (for a first write, a migration, and the tests)."""
    out: dict[RecordKey, Record] = {("engine", ""): _engine(graph)}
    for volume in graph.volumes.values():
        out[("volume", volume.name)] = _volume(volume)
    for node in graph.nodes.values():
        out[("node", str(node.id))] = _node(node)
    for map_id, bitmap in graph.maps.items():
        out[("map", map_id)] = _map(bitmap)
    for key, start in graph.synced.items():
        out[("synced", _pair(key))] = {"format": FORMAT, "start": start}
    for memory in graph.released:
        out[("released", memory)] = {"format": FORMAT}
    return out


def segments(graph: Graph) -> dict[tuple[str, int], bytes]:
    """Every stored segment of every map."""
    return {(map_id, index): data for map_id, bitmap in graph.maps.items()
            for index, data in bitmap.segments()}


def load(stored: Mapping[RecordKey, Record],
         stored_segments: Mapping[tuple[str, int], bytes]) -> Graph:
    """The graph those records and segments describe."""
    engine = stored.get(("engine", ""), {"clock": 0, "next_id": 1})
    graph = Graph(clock=int(engine["clock"]), next_id=int(engine["next_id"]))
    for (kind, name), record in stored.items():
        _check_format(kind, name, record)
        if kind == "volume":
            graph.volumes[name] = Volume(
                name, int(record["uid"]), Kind(record["kind"]), int(record["size_blocks"]),
                int(record["block_size"]), str(record["memory"]), int(record["node"]),
                [Interval(int(a), str(b), c) for a, b, c in record["intervals"]])
        elif kind == "node":
            node = Node(int(name), str(record["memory"]), str(record["valid"]),
                        record["parent"], Link(record["link"]) if record["link"] else None,
                        record["volume"], [int(c) for c in record["children"]],
                        bool(record["spill"]))
            graph.nodes[node.id] = node
        elif kind == "map":
            graph.maps[name] = SegmentedBitmap(int(record["size"]), bool(record["default"]))
        elif kind == "synced":
            a, _, b = name.partition("-")
            graph.synced[(int(a), int(b))] = int(record["start"])
        elif kind == "released":
            graph.released.append(name)
    for node_id in sorted(graph.nodes):
        node = graph.nodes[node_id]
        graph.by_memory.setdefault(node.memory, []).append(node.id)
    for (map_id, index), data in stored_segments.items():
        bitmap = graph.maps.get(map_id)
        if bitmap is not None:  # a segment of a map dropped mid-way is debris
            bitmap.load_segment(index, data)
    graph.released.sort()
    return graph


def _check_format(kind: str, name: str, record: Record) -> None:
    if record.get("format") != FORMAT:
        raise ValueError(f"record {kind}/{name} has format {record.get('format')!r}; this "
                         f"version of volkin reads format {FORMAT}")


def _engine(graph: Graph) -> Record:
    return {"format": FORMAT, "clock": graph.clock, "next_id": graph.next_id}


def _volume(v: Volume) -> Record:
    return {"format": FORMAT, "uid": v.uid, "kind": v.kind.value, "size_blocks": v.size_blocks,
            "block_size": v.block_size, "memory": v.memory, "node": v.node,
            "intervals": [[i.start, i.modified, i.replaced] for i in v.intervals]}


def _node(n: Node) -> Record:
    return {"format": FORMAT, "memory": n.memory, "valid": n.valid, "parent": n.parent,
            "link": n.link.value if n.link else None, "volume": n.volume,
            "children": list(n.children), "spill": n.spill}


def _map(bitmap: SegmentedBitmap) -> Record:
    return {"format": FORMAT, "size": bitmap.size, "default": bitmap.default}


def _pair(key: tuple[int, int]) -> str:
    return f"{key[0]}-{key[1]}"
