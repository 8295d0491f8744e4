"""Turns one block operation into a plan, without changing the graph.

The planner works on an overlay of the committed maps: it decides a step,
records the bits that step will change in the overlay, and decides the next
step from there. The graph itself changes only when the caller reports a
commit (`MapEngine.apply`), so a plan that is cut short by a crash leaves the
committed maps exactly as the last completed commit left them.

Three rules generate every plan; the figures of the source are special cases
(see `volkin.engine.rules` for the table that maps each figure to them).

* **resolve** — a node's contents of block n are in its own memory if its V
  bit is set, else those of its parent (recursively).
* **materialize(X, n)** — make X's memory hold X's contents of block n:
  first *evict* every other node that holds a different version of block n in
  X's memory (a ghost, after a refresh), then copy X's contents there from
  wherever they resolve to, then set V[X][n]. If X's contents already resolve
  to X's own memory (held for a ghost), only the bit is set.
* **evict(G, n)** — before block n of G's memory is overwritten, every live
  node that reads block n through G gets materialized (copy first), then
  V[G][n] is cleared, and that commit happens before the overwrite.

A write to X first materializes every node that reads block n through X (the
copy-on-write of Figs 4, 6 and 8), then evicts what X's memory holds for others
(the push to S2 of Figs 7, 8 and 9), then materializes X itself unless the
write covers the whole block, commits M[X][n] and only then writes.
"""

from __future__ import annotations

from collections.abc import Iterator

from volkin.engine.errors import MapInvariantBroken
from volkin.engine.graph import Graph, Node, Volume
from volkin.engine.plan import BitChange, Commit, Copy, Loc, Plan, Read, Step, Write

# Deeper than any hierarchy a test or an operator builds; a guard against a
# cycle in the rules, which would be a bug.
_MAX_DEPTH = 256


class PlanBuilder:
    def __init__(self, graph: Graph, block: int) -> None:
        self.graph = graph
        self.block = block
        self.steps: list[Step] = []
        self._overlay: dict[str, bool] = {}  # map id -> bit `block` as the plan leaves it
        self._pending: dict[str, bool] = {}  # changes not yet in a Commit step
        self._vacating: set[str] = set()  # memories whose block this plan is freeing

    # -- bits ------------------------------------------------------------------
    def bit(self, map_id: str) -> bool:
        if map_id in self._overlay:
            return self._overlay[map_id]
        return self.graph.maps[map_id].get(self.block)

    def set_bit(self, map_id: str, value: bool) -> None:
        if self.bit(map_id) == value:
            return
        self._overlay[map_id] = value
        self._pending[map_id] = value

    def valid(self, node: Node) -> bool:
        return self.bit(node.valid)

    def commit(self) -> None:
        """Emits the pending bit changes as one Commit step (after the copies before it)."""
        if self._pending:
            changes = tuple(BitChange(m, self.block, v) for m, v in self._pending.items())
            self.steps.append(Commit(changes))
            self._pending = {}

    def plan(self) -> Plan:
        self.commit()
        return Plan(self.block, tuple(self.steps))

    # -- the three rules -------------------------------------------------------
    def resolve(self, node: Node) -> Loc:
        current = node
        for _ in range(_MAX_DEPTH):
            if self.valid(current):
                return Loc(current.memory, self.block)
            if current.parent is None:
                raise MapInvariantBroken(
                    f"block {self.block} of node {node.id} resolves to nothing "
                    f"(node {current.id} has no valid data and no parent)")
            current = self.graph.nodes[current.parent]
        raise MapInvariantBroken(f"block {self.block}: parent chain of node {node.id} too deep")

    def readers_through(self, node: Node, depth: int = 0) -> Iterator[Node]:
        """Live nodes whose contents of this block are `node`'s (through ghosts too)."""
        if depth > _MAX_DEPTH:
            raise MapInvariantBroken(f"block {self.block}: dependents of node {node.id} too deep")
        for child_id in list(node.children):
            child = self.graph.nodes[child_id]
            if self.valid(child):
                continue
            if child.is_ghost:
                yield from self.readers_through(child, depth + 1)
            else:
                yield child

    def materialize(self, node: Node, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise MapInvariantBroken(f"block {self.block}: materialize recursion too deep")
        if self.valid(node):
            return
        own = Loc(node.memory, self.block)
        if self.resolve(node) == own:
            # A ghost sharing this memory holds exactly this node's contents.
            self.set_bit(node.valid, True)
            return
        self.evict_others(node, depth + 1)
        if self.valid(node):
            return
        self.steps.append(Copy(self.resolve(node), own))
        self.set_bit(node.valid, True)

    def evict_others(self, keeper: Node, depth: int = 0) -> None:
        """Frees block n of `keeper`'s memory from every other node that holds it."""
        self._vacating.add(keeper.memory)
        pushed = False
        for other in self.graph.nodes_of_memory(keeper.memory):
            if other.id == keeper.id or not self.valid(other):
                continue
            readers = list(self.readers_through(other))
            if readers:
                pushed = True
                if any(reader.memory in self._vacating for reader in readers):
                    # A reader's own block is being freed further up this plan: a
                    # swap. Park the data in the ghost's spill memory instead.
                    spill = self.graph.spill_of(other)
                    self.steps.append(Copy(Loc(other.memory, self.block),
                                           Loc(spill.memory, self.block)))
                    self.set_bit(spill.valid, True)
                else:
                    for reader in readers:
                        self.materialize(reader, depth + 1)
            self.set_bit(other.valid, False)
        self._vacating.discard(keeper.memory)
        if pushed:
            # The block is about to be overwritten: the copies that preserve it
            # must be committed first. Without readers there is nothing to
            # preserve (a ghost never gains readers), so clearing its bit may
            # ride on the next commit.
            self.commit()

    # -- operations --------------------------------------------------------------
    def read(self, node: Node) -> Plan:
        self.steps.append(Read(self.resolve(node)))
        return self.plan()

    def write(self, volume: Volume, node: Node, whole_block: bool) -> Plan:
        # M before data: an interrupted write may have changed the block, and a
        # later incremental refresh must see it as modified. Set first, it rides
        # on the plan's first commit.
        self.set_bit(volume.intervals[-1].modified, True)
        # 1. Copy-on-write: everything reading this block through the volume keeps
        #    the contents it has now.
        for reader in list(self.readers_through(node)):
            self.materialize(reader)
        # 2. The volume's memory may hold the block for a ghost; push it out.
        self.evict_others(node)
        # 3. A partial write needs the current contents under it.
        validate_after_write = False
        if not self.valid(node):
            if whole_block:
                validate_after_write = True
            else:
                self.materialize(node)
        self.commit()
        target = Loc(node.memory, self.block)
        self.steps.append(Write(target, durable=validate_after_write))
        if validate_after_write:
            # Validating before the data lands would expose stale bytes after a crash.
            self.set_bit(node.valid, True)
        return self.plan()

    def background(self, node: Node) -> Plan:
        self.materialize(node)
        return self.plan()
