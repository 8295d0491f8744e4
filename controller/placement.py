"""Where each memory of the engine lives: one extent on one agent.

The engine names memories (`V2#3` for volume V2, `V2#3~9` for a ghost's spill
memory); the agents know extents. Placement maps one to the other, by agent
node id (addresses are the agent client's business: they come from the agents'
registrations and may change across restarts). A volume's memory is one extent
on one agent, chosen round robin among the registered agents when it is first
placed; a spill memory goes to the agent of the memory it spills for. Striping a
volume over several agents will replace this module's choice, not its callers.
The controller stores the placement in etcd (`to_json`) before it creates an
extent, so a restarted controller finds every extent again.

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
        self._next = 0
        self._extents: dict[str, tuple[str, str]] = {}  # memory -> (node id, extent id)

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
            node_id = self.nodes[self._next % len(self.nodes)]
            self._next += 1
        self._extents[memory] = (node_id, extent_id(memory))
        return ExtentRef(node_id, extent_id(memory))

    def forget(self, memory: str) -> ExtentRef | None:
        found = self._extents.pop(memory, None)
        return ExtentRef(*found) if found else None

    def nodes_of(self, memory: str) -> list[str]:
        found = self._extents.get(memory)
        return [found[0]] if found else []

    def to_json(self) -> bytes:
        return json.dumps({"next": self._next, "extents": self._extents}, sort_keys=True).encode()

    def load_json(self, raw: bytes) -> None:
        record = json.loads(raw)
        self._next = int(record["next"])
        self._extents = {m: (str(n), str(e)) for m, (n, e) in record["extents"].items()}


def extent_id(memory: str) -> str:
    """An agent-safe extent id: `V2#3` -> `m3`, `V2#3~9` -> `m3-s9` (unique ids, no names)."""
    base, _, spill = memory.partition("~")
    uid = base.rpartition("#")[2]
    return f"m{uid}" + (f"-s{spill}" if spill else "")
