"""Plans: what the engine tells its caller to do, and in which order.

The engine never touches a disk, a socket or etcd. For every operation it
returns a `Plan`: an ordered tuple of steps that the caller (the controller,
or the in-memory executor of the tests) carries out one after another.

The caller's duties, in order of importance:

1. Carry out the steps in the order given. Steps between two `Commit`s may run
   concurrently with each other; nothing may be moved across a `Commit`.
2. Before a `Commit`, every `Copy` and `Write` that precedes it in the plan must
   be durable on its agent. (Copied data is durable *before* the map bit that
   makes it valid is committed.)
3. A `Commit` is atomic: all of its bit changes reach etcd in one transaction
   (several plans' commits may share one transaction: group commit), and only
   then does the caller call `MapEngine.apply(commit)`. A failed commit must
   stop the plan: the steps after it would overwrite data that the committed
   maps still say is needed.
4. Acknowledge a write to its client only after the whole plan has completed.
5. Serialise plans that share a unit: the volume's family
   (`MapEngine.family`) and `Plan.unit`, the block; plans of different units may
   run concurrently. A topology operation (snapshot, refresh, delete, detach)
   runs while no plan of the families of the volumes it names is in flight.
6. After a topology operation, persist what `MapEngine.take_changes` returns,
   in one transaction, before any plan of the families it touched runs, and in
   the order the changes were taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Loc:
    """Block `block` of memory `memory` (one volume's extent on its agents)."""

    memory: str
    block: int

    def __str__(self) -> str:
        return f"{self.memory}[{self.block}]"


@dataclass(frozen=True)
class BitChange:
    """Set bit `block` of map `map_id` to `value` (and the `count` - 1 bits after it: only
    a `CopyRun`'s commit sets more than one)."""

    map_id: str
    block: int
    value: bool
    count: int = 1

    def __str__(self) -> str:
        where = f"{self.block}" if self.count == 1 else f"{self.block}:{self.block + self.count}"
        return f"{self.map_id}[{where}]={int(self.value)}"


@dataclass(frozen=True)
class Copy:
    """Copy one block; it must be durable before the next `Commit`."""

    source: Loc
    target: Loc

    def __str__(self) -> str:
        return f"copy {self.source} -> {self.target}"


@dataclass(frozen=True)
class Commit:
    """Commit these map changes atomically, after every earlier copy and write is durable."""

    changes: tuple[BitChange, ...]

    def __str__(self) -> str:
        return "commit " + ", ".join(str(c) for c in self.changes)


@dataclass(frozen=True)
class Write:
    """Write the caller's data (all or part of the block) here.

    `durable` is set when a later `Commit` of the same plan validates this
    block: the data must then reach stable storage before that commit, as
    for a copy.
    """

    target: Loc
    durable: bool = False

    def __str__(self) -> str:
        return f"write {self.target}" + (" (durable)" if self.durable else "")


@dataclass(frozen=True)
class Read:
    """Read the caller's data from here."""

    source: Loc

    def __str__(self) -> str:
        return f"read {self.source}"


Step = Copy | Commit | Write | Read


@dataclass(frozen=True)
class CopyRun:
    """The background copy of `count` consecutive blocks whose plans are all the same two
    steps: copy the block from `source`'s memory into `target`'s, then commit its valid
    bit. Carried out as one: every block's copy durable, then `commit` (all the bits in
    one change). `MapEngine.plan_background_run` returns one only when that is exactly
    what `plan_background` would plan for each block of the run, so a run cut short by
    a crash is a set of copies whose commit never happened, as for single blocks."""

    source: Loc  # the run's first block in the memory its contents resolve to
    target: Loc  # the run's first block in the volume's own memory
    count: int
    commit: Commit

    def __str__(self) -> str:
        return f"copy run {self.source} -> {self.target} x{self.count}; {self.commit}"


@dataclass(frozen=True)
class Plan:
    """An ordered list of steps for one block operation.

    `unit` is what the caller must serialise on, with the volume's family: the
    block index. Every step of a plan touches block `unit` only (of several
    memories and maps of one family), so plans for different blocks or families
    commute; two plans for the same block of one family must not overlap.
    """

    unit: int
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def copies(self) -> tuple[Copy, ...]:
        return tuple(s for s in self.steps if isinstance(s, Copy))

    @property
    def commits(self) -> tuple[Commit, ...]:
        return tuple(s for s in self.steps if isinstance(s, Commit))

    @property
    def plain_write(self) -> Loc | None:
        """The fast path: where the data goes when the plan is that write alone — no copy,
        no commit, nothing to make durable first. The caller may send such writes of
        neighbouring blocks as one."""
        if len(self.steps) == 1:
            step = self.steps[0]
            if isinstance(step, Write) and not step.durable:
                return step.target
        return None

    def __str__(self) -> str:
        return f"plan(block {self.unit}): " + "; ".join(str(s) for s in self.steps)
