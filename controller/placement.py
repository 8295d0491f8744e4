"""Where each memory of the engine lives: one extent on one agent.

The engine names memories (`V2#3` for volume V2, `V2#3~9` for a ghost's spill
memory); the agents know extents. Placement maps one to the other. For now a
volume's memory is one extent on one agent, chosen round robin, and a spill
memory goes to the agent of the memory it spills for. Striping a volume over
several agents will replace this module's choice, not its callers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExtentRef:
    agent: str  # host:port of the agent
    extent_id: str


class Placement:
    def __init__(self, agents: list[str]) -> None:
        if not agents:
            raise ValueError("placement needs at least one agent")
        self._agents = list(agents)
        self._next = 0
        self._extents: dict[str, ExtentRef] = {}

    def extent_of(self, memory: str) -> ExtentRef | None:
        return self._extents.get(memory)

    def place(self, memory: str) -> ExtentRef:
        """The extent of `memory`, choosing one for a memory seen the first time."""
        ref = self._extents.get(memory)
        if ref is not None:
            return ref
        base, _, spill = memory.partition("~")
        if spill and base in self._extents:
            agent = self._extents[base].agent
        else:
            agent = self._agents[self._next % len(self._agents)]
            self._next += 1
        ref = ExtentRef(agent, extent_id(memory))
        self._extents[memory] = ref
        return ref

    def forget(self, memory: str) -> ExtentRef | None:
        return self._extents.pop(memory, None)


def extent_id(memory: str) -> str:
    """An agent-safe extent id: `V2#3` -> `m3`, `V2#3~9` -> `m3-s9` (unique ids, no names)."""
    base, _, spill = memory.partition("~")
    uid = base.rpartition("#")[2]
    return f"m{uid}" + (f"-s{spill}" if spill else "")
