"""Locks sized to what they protect: (family, block) for plans, whole families for topology.

A *family* is a set of volumes joined by reading through one another or by sharing
a memory (`MapEngine.family`); plans and topology changes of different families
never touch the same memory or map. So:

- a plan (a read, a write, a background step) holds its volume's family *shared*
  and the blocks it touches of that family; plans of one family on different
  blocks run at once, and plans of different families never wait for each other;
- a topology change (snapshot, refresh, delete, detach) holds the families of the
  volumes it names *exclusively*: it waits until their plans in flight are done,
  and their new plans wait for it (it is never starved). Other families go on.

Family ids move when a topology change joins or splits families, so a plan checks,
once it holds a family, that its volume still belongs to it (else it tries again
with the new one), and a topology change checks the same after it holds every
family it named. Families are taken in ascending order, so topology changes
cannot deadlock each other; a plan holds one family only.

Nothing is kept for a family or a block nobody holds or waits for, so a job over a
1 TiB volume does not leave 16 million locks behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from volkin.engine import MapEngine


class _Gate:
    """Shared (plans) or exclusive (a topology change) hold of one family."""

    def __init__(self) -> None:
        self.cond = asyncio.Condition()
        self.plans = 0
        self.topology = False
        self.topology_waiting = 0
        self.users = 0  # holders and waiters: the gate is dropped when this reaches 0

    async def enter_plan(self) -> None:
        async with self.cond:
            await self.cond.wait_for(lambda: not self.topology and not self.topology_waiting)
            self.plans += 1

    async def leave_plan(self) -> None:
        async with self.cond:
            self.plans -= 1
            self.cond.notify_all()

    async def enter_topology(self) -> None:
        async with self.cond:
            self.topology_waiting += 1
            try:
                await self.cond.wait_for(lambda: self.plans == 0 and not self.topology)
            finally:
                self.topology_waiting -= 1
            self.topology = True

    async def leave_topology(self) -> None:
        async with self.cond:
            self.topology = False
            self.cond.notify_all()


class FamilyLocks:
    def __init__(self, engine: MapEngine) -> None:
        self._engine = engine
        self._gates: dict[int, _Gate] = {}
        self._blocks: dict[tuple[int, int], tuple[asyncio.Lock, int]] = {}
        # Background runs held, per family: (first block, end, set when it ends).
        self._runs: dict[int, list[tuple[int, int, asyncio.Event]]] = {}

    def __len__(self) -> int:
        """Families and blocks with a lock object right now (for tests)."""
        return len(self._gates) + len(self._blocks)

    # -- plans ---------------------------------------------------------------------
    @asynccontextmanager
    async def plan(self, name: str, blocks: Iterable[int]) -> AsyncIterator[int]:
        """Holds `name`'s family shared and `blocks` of it; yields the family."""
        family = await self._enter_family(name)
        units = [(family, block) for block in sorted(set(blocks))]
        refs: list[tuple[int, int]] = []
        held: list[tuple[int, int]] = []
        try:
            while (run := self._run_over(family, units[0][1], units[-1][1] + 1)
                   if units else None) is not None:
                await run.wait()
            # No await from the check above to here: a run starting now sees these blocks.
            for unit in units:
                self._ref_block(unit)
                refs.append(unit)
            for unit in units:
                await self._blocks[unit][0].acquire()
                held.append(unit)
            yield family
        finally:
            for unit in reversed(held):
                self._blocks[unit][0].release()
            for unit in refs:
                self._unref_block(unit)
            gate = self._gates[family]
            await gate.leave_plan()
            self._unref_gate(family)

    @asynccontextmanager
    async def run(self, name: str, first: int, count: int) -> AsyncIterator[int]:
        """Holds `name`'s family shared and blocks [first, first + count) of it, as one
        range (a background run: nothing is kept per block). Plans that want a block of
        it wait for the run; the run waits for the plans that hold or wait for one."""
        family = await self._enter_family(name)
        stop = first + count
        done = asyncio.Event()
        runs = self._runs.setdefault(family, [])
        entry = (first, stop, done)
        try:
            while (other := self._run_over(family, first, stop)) is not None:
                await other.wait()
            runs.append(entry)
            gate = self._gates[family]
            async with gate.cond:  # notified by every plan that leaves the family
                await gate.cond.wait_for(lambda: not any(
                    f == family and first <= b < stop for f, b in self._blocks))
            yield family
        finally:
            if entry in runs:
                runs.remove(entry)
            if not runs:
                self._runs.pop(family, None)
            done.set()
            gate = self._gates[family]
            await gate.leave_plan()
            self._unref_gate(family)

    def _run_over(self, family: int, first: int, stop: int) -> asyncio.Event | None:
        """The end of a run of `family` that overlaps [first, stop), if one is held."""
        for begin, end, done in self._runs.get(family, ()):
            if begin < stop and first < end:
                return done
        return None

    async def _enter_family(self, name: str) -> int:
        while True:
            family = self._engine.family(name)  # NotFound if the volume is gone
            gate = self._ref_gate(family)
            try:
                await gate.enter_plan()
            except BaseException:
                self._unref_gate(family)
                raise
            try:
                if self._engine.family(name) == family:
                    return family
            except BaseException:
                await gate.leave_plan()
                self._unref_gate(family)
                raise
            await gate.leave_plan()  # joined or split while we waited: again
            self._unref_gate(family)

    # -- topology changes -------------------------------------------------------------
    @asynccontextmanager
    async def topology(self, *names: str) -> AsyncIterator[None]:
        """Holds the families of the existing volumes among `names` exclusively."""
        while True:
            families = self._families(names)
            entered: list[int] = []
            try:
                for family in families:
                    gate = self._ref_gate(family)
                    try:
                        await gate.enter_topology()
                    except BaseException:
                        self._unref_gate(family)
                        raise
                    entered.append(family)
            except BaseException:
                await self._leave_topology(entered)
                raise
            if self._families(names) == families:
                break
            await self._leave_topology(entered)
        try:
            yield
        finally:
            await self._leave_topology(entered)

    def _families(self, names: Iterable[str]) -> list[int]:
        volumes = self._engine.graph.volumes
        return sorted({self._engine.family(n) for n in names if n in volumes})

    async def _leave_topology(self, families: list[int]) -> None:
        for family in reversed(families):
            await self._gates[family].leave_topology()
            self._unref_gate(family)

    # -- bookkeeping ---------------------------------------------------------------
    def _ref_gate(self, family: int) -> _Gate:
        gate = self._gates.get(family)
        if gate is None:
            gate = self._gates[family] = _Gate()
        gate.users += 1
        return gate

    def _unref_gate(self, family: int) -> None:
        gate = self._gates[family]
        gate.users -= 1
        if gate.users == 0:
            del self._gates[family]

    def _ref_block(self, unit: tuple[int, int]) -> asyncio.Lock:
        lock, users = self._blocks.get(unit) or (asyncio.Lock(), 0)
        self._blocks[unit] = (lock, users + 1)
        return lock

    def _unref_block(self, unit: tuple[int, int]) -> None:
        lock, users = self._blocks[unit]
        if users == 1:
            del self._blocks[unit]
        else:
            self._blocks[unit] = (lock, users - 1)
