"""Where each memory of the engine lives: one extent on one agent.

The engine names memories (`V2#3` for volume V2, `V2#3~9` for a ghost's spill
memory); the agents know extents. Placement maps one to the other, by agent
node id (addresses come from the agents' registrations and may change across
restarts). A volume's memory is one extent on one agent, chosen round robin
among the agents known when it is created; a spill memory goes to the agent of
the memory it spills for. Striping a volume over several agents will replace
this module's choice, not its callers. The controller stores the placement in
etcd (`to_json`) before it creates an extent, so a restarted controller finds
every extent again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from volkin.errors import NotFound, Unavailable


@dataclass(frozen=True)
class ExtentRef:
    agent: str  # host:port of the agent
    extent_id: str
    node_id: str = ""


class Placement:
    def __init__(self, agents: dict[str, str] | list[str]) -> None:
        # node id -> address; a plain list of addresses names each agent by its address.
        self.agents: dict[str, str] = (dict(agents) if isinstance(agents, dict)
                                       else {address: address for address in agents})
        self._next = 0
        self._extents: dict[str, tuple[str, str]] = {}  # memory -> (node id, extent id)

    def update_agents(self, agents: dict[str, str]) -> None:
        """The agents registered now (node id -> address); known extents keep their node."""
        self.agents = dict(agents)

    def extent_of(self, memory: str) -> ExtentRef | None:
        found = self._extents.get(memory)
        if found is None:
            return None
        node_id, extent = found
        address = self.agents.get(node_id)
        if address is None:
            raise Unavailable(f"agent {node_id}, which holds {memory}, is not registered")
        return ExtentRef(address, extent, node_id)

    def place(self, memory: str) -> ExtentRef:
        """The extent of `memory`, choosing one for a memory seen the first time."""
        known = self.extent_of(memory)
        if known is not None:
            return known
        base, _, spill = memory.partition("~")
        if spill and base in self._extents:
            node_id = self._extents[base][0]
        else:
            if not self.agents:
                raise Unavailable("no agent is registered: start volkin-agent on a storage node")
            ordered = sorted(self.agents)
            node_id = ordered[self._next % len(ordered)]
            self._next += 1
        self._extents[memory] = (node_id, extent_id(memory))
        return self.extent_of(memory) or _never(memory)

    def forget(self, memory: str) -> ExtentRef | None:
        ref = self.extent_of(memory)
        self._extents.pop(memory, None)
        return ref

    def nodes_of(self, memory: str) -> list[str]:
        found = self._extents.get(memory)
        return [found[0]] if found else []

    def to_json(self) -> bytes:
        return json.dumps({"next": self._next, "extents": self._extents}, sort_keys=True).encode()

    def load_json(self, raw: bytes) -> None:
        record = json.loads(raw)
        self._next = int(record["next"])
        self._extents = {m: (str(n), str(e)) for m, (n, e) in record["extents"].items()}


def _never(memory: str) -> ExtentRef:
    raise NotFound(f"memory {memory} has no extent")


def extent_id(memory: str) -> str:
    """An agent-safe extent id: `V2#3` -> `m3`, `V2#3~9` -> `m3-s9` (unique ids, no names)."""
    base, _, spill = memory.partition("~")
    uid = base.rpartition("#")[2]
    return f"m{uid}" + (f"-s{spill}" if spill else "")
