"""Where each memory of the engine lives: one extent on one agent.

The engine names memories (`V2#3` for volume V2, `V2#3~9` for a ghost's spill
memory); the agents know extents. Placement maps one to the other, by agent
node id (addresses are the agent client's business: they come from the agents'
registrations and may change across restarts). A volume's memory is one extent
on one agent: the registered agent that holds the fewest extents when the memory
is first placed (ties by name); a spill memory goes to the agent of the memory it
spills for. Striping a volume over several agents will replace this module's
choice, not its callers. The controller stores each memory's placement in etcd,
one record per memory (`Keys.extent`), before it creates the extent, so a
restarted controller finds every extent again.

Only `place` chooses; `extent_of` only looks, so a read or a flush never changes
the placement.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from volkin.errors import Unavailable


@dataclass(frozen=True)
class ExtentRef:
    node_id: str
    extent_id: str


class Placement:
    def __init__(self, nodes: Iterable[str] = ()) -> None:
        self.nodes = sorted(nodes)  # agents that may receive new memories
        self._extents: dict[str, tuple[str, str]] = {}  # memory -> (node id, extent id)
        self._load: dict[str, int] = {}  # node id -> extents placed there

    def update_nodes(self, nodes: Iterable[str]) -> None:
        """The agents registered now; known extents keep their node."""
        self.nodes = sorted(nodes)

    def extent_of(self, memory: str) -> ExtentRef | None:
        found = self._extents.get(memory)
        return ExtentRef(*found) if found else None

    def place(self, memory: str) -> ExtentRef:
        """The extent of `memory`, choosing one for a memory seen the first time."""
        known = self.extent_of(memory)
        if known is not None:
            return known
        base, _, spill = memory.partition("~")
        if spill and base in self._extents:
            node_id = self._extents[base][0]
        else:
            if not self.nodes:
                raise Unavailable("no agent is registered: start volkin-agent on a storage node")
            node_id = min(self.nodes, key=lambda n: (self._load.get(n, 0), n))
        self._add(memory, node_id, extent_id(memory))
        return ExtentRef(node_id, extent_id(memory))

    def forget(self, memory: str) -> ExtentRef | None:
        found = self._extents.pop(memory, None)
        if found is None:
            return None
        self._load[found[0]] -= 1
        return ExtentRef(*found)

    def _add(self, memory: str, node_id: str, extent: str) -> None:
        self._extents[memory] = (node_id, extent)
        self._load[node_id] = self._load.get(node_id, 0) + 1

    def nodes_of(self, memory: str) -> list[str]:
        found = self._extents.get(memory)
        return [found[0]] if found else []

    def memories(self) -> list[str]:
        return sorted(self._extents)

    @staticmethod
    def record(ref: ExtentRef) -> bytes:
        """The etcd record of one memory's placement."""
        return json.dumps({"format": 1, "node_id": ref.node_id, "extent_id": ref.extent_id},
                          sort_keys=True).encode()

    def load_records(self, records: dict[str, bytes]) -> None:
        """Memory -> record, as `record` wrote them."""
        for memory, raw in records.items():
            found = json.loads(raw)
            self._add(memory, str(found["node_id"]), str(found["extent_id"]))


def extent_id(memory: str) -> str:
    """An agent-safe extent id: `V2#3` -> `m3`, `V2#3~9` -> `m3-s9` (unique ids, no names)."""
    base, _, spill = memory.partition("~")
    uid = base.rpartition("#")[2]
    return f"m{uid}" + (f"-s{spill}" if spill else "")
