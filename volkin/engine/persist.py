"""The engine's state as plain data: what the controller keeps in etcd.

`dump` splits the graph into a *topology* record (volumes, nodes, intervals,
reference points; small, rewritten by topology operations) and *map segments*
(map id, segment index -> bytes; written by commits, only the segments that
differ from the map's default). `load` rebuilds an engine from exactly that,
which is how a controller recovers after a crash: the maps in etcd are the
truth, whatever plans were cut short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from volkin.engine.bitmap import SegmentedBitmap
from volkin.engine.engine import MapEngine
from volkin.engine.graph import Graph, Interval, Kind, Link, Node, Volume


@dataclass
class EngineState:
    topology: dict[str, Any]
    # map id -> (size, default); absent segments take the default.
    maps: dict[str, tuple[int, bool]] = field(default_factory=dict)
    segments: dict[tuple[str, int], bytes] = field(default_factory=dict)


def dump(engine: MapEngine) -> EngineState:
    graph = engine.graph
    topology: dict[str, Any] = {
        "clock": graph.clock,
        "next_id": graph.next_id,
        "released": list(graph.released),
        "synced": [[a, b, start] for (a, b), start in sorted(graph.synced.items())],
        "volumes": [
            {"name": v.name, "uid": v.uid, "kind": v.kind.value, "size_blocks": v.size_blocks,
             "block_size": v.block_size, "memory": v.memory, "node": v.node,
             "intervals": [[i.start, i.modified, i.replaced] for i in v.intervals]}
            for v in graph.volumes.values()
        ],
        "nodes": [
            {"id": n.id, "memory": n.memory, "valid": n.valid, "parent": n.parent,
             "link": n.link.value if n.link else None, "volume": n.volume,
             "children": list(n.children), "spill": n.spill}
            for n in graph.nodes.values()
        ],
    }
    state = EngineState(topology)
    for map_id, bitmap in graph.maps.items():
        state.maps[map_id] = (bitmap.size, bitmap.default)
        for index, data in bitmap.segments():
            state.segments[(map_id, index)] = data
    return state


def load(state: EngineState) -> MapEngine:
    top = state.topology
    graph = Graph(clock=top["clock"], next_id=top["next_id"])
    graph.released = list(top["released"])
    graph.synced = {(a, b): start for a, b, start in top["synced"]}
    for v in top["volumes"]:
        graph.volumes[v["name"]] = Volume(
            v["name"], v["uid"], Kind(v["kind"]), v["size_blocks"], v["block_size"],
            v["memory"], v["node"], [Interval(*i) for i in v["intervals"]])
    for n in top["nodes"]:
        node = Node(n["id"], n["memory"], n["valid"], n["parent"],
                    Link(n["link"]) if n["link"] else None, n["volume"], list(n["children"]),
                    n["spill"])
        graph.nodes[node.id] = node
        graph.by_memory.setdefault(node.memory, []).append(node.id)
    for map_id, (size, default) in state.maps.items():
        graph.maps[map_id] = SegmentedBitmap(size, default)
    for (map_id, index), data in state.segments.items():
        graph.maps[map_id].load_segment(index, data)
    return MapEngine(graph)
