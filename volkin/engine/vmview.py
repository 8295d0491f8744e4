"""The maps as the source draws them: VM map (V, M) per volume and the refresh map.

volkin stores the same information in a more general shape (see `graph`):
valid maps per node, modified maps per interval, ghosts for old contents. This
module renders it back into the two bits per block of Figs 3A-3F, so that the
figures can be checked bit for bit and operators can read a volume's state in
the source's terms.

- V[X][n]: X's memory holds X's contents of block n.
- M[X][n]: block n was written since X's latest reference point, or X's memory
  still holds old contents of block n that another volume (S2) reads.
- R[X][n]: X is a refresh target and block n has not been copied yet.
"""

from __future__ import annotations

from volkin.engine.engine import MapEngine
from volkin.engine.graph import Link
from volkin.engine.planner import PlanBuilder


def vm_map(engine: MapEngine, name: str) -> tuple[list[int], list[int]]:
    volume = engine.volume(name)
    graph = engine.graph
    live = graph.nodes[volume.node]
    modified = graph.maps[volume.intervals[-1].modified]
    v_bits: list[int] = []
    m_bits: list[int] = []
    for n in range(volume.size_blocks):
        builder = PlanBuilder(graph, n)
        held_for_others = any(
            builder.valid(node) and any(True for _ in builder.readers_through(node))
            for node in graph.nodes_of_memory(volume.memory) if node.is_ghost)
        v_bits.append(int(builder.valid(live)))
        m_bits.append(int(modified.get(n) or held_for_others))
    return v_bits, m_bits


def refresh_map(engine: MapEngine, name: str) -> list[int]:
    volume = engine.volume(name)
    live = engine.graph.nodes[volume.node]
    valid = engine.graph.maps[live.valid]
    refreshing = live.parent is not None and live.link is Link.REFRESH
    return [int(refreshing and not valid.get(n)) for n in range(volume.size_blocks)]
