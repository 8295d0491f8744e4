"""Drives the engine and the reference model side by side, checking every crash point.

`Harness` carries out each plan step by step through the in-memory executor.
After every step it asks the engine, from its *committed* maps only, what each
volume reads at the plan's block, and compares with the model: that is the
state a controller would recover after a crash at that point. Only the block
being written may read either its old or its new contents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from volkin.engine import BitChange, Commit, Conflict, Copy, CopyRun, Loc, MapEngine, Plan, Read
from volkin.engine import records as rec
from volkin.engine.memstore import MemoryStore
from volkin.engine.reference import ReferenceModel

T = TypeVar("T")


class Divergence(AssertionError):
    pass


class Harness:
    def __init__(self, block_size: int = 16, check_every_step: bool = True,
                 track_records: bool = True) -> None:
        self.block_size = block_size
        self.engine = MapEngine()
        self.store = MemoryStore(block_size)
        self.model = ReferenceModel(block_size)
        self.check_every_step = check_every_step
        self.plans_run = 0
        # The records a controller would hold in etcd: only what `take_changes` said.
        # Without `track_records` the changes stay in the engine for the caller to take
        # (a test of the real store), and `restart` is not available.
        self.track_records = track_records
        self.stored: dict[rec.RecordKey, rec.Record] = {}

    @classmethod
    def filled(cls, names: tuple[str, ...], blocks: int, block_size: int,
               track_records: bool = True) -> Harness:
        """Unrelated volumes whose blocks all hold distinct, recognisable bytes."""
        h = cls(block_size=block_size, track_records=track_records)
        for i, name in enumerate(names):
            h.create_volume(name, blocks)
            for n in range(blocks):
                h.write(name, n, 0, bytes([(16 * i + n) % 255 + 1]) * block_size)
        return h

    # -- topology (atomic: one etcd transaction each) ---------------------------
    def topology(self, operation: Callable[[], T]) -> T:
        """Runs a topology operation and persists what it says it changed, checking that
        this is everything it changed: the stored records then equal a full dump, and
        every segment that moved belongs to a map it named."""
        if not self.track_records:
            return operation()
        before = rec.segments(self.engine.graph)
        try:
            return operation()
        finally:
            changes = self.engine.take_changes()
            for key, value in changes.records.items():
                if value is None:
                    self.stored.pop(key, None)
                else:
                    self.stored[key] = value
            full = rec.records(self.engine.graph)
            if self.stored != full:
                missing = {k for k in full if self.stored.get(k) != full[k]}
                extra = set(self.stored) - set(full)
                raise Divergence(f"a topology change did not report every record it changed: "
                                 f"stale {sorted(missing)}, left over {sorted(extra)}")
            expected = {k: v for k, v in before.items() if k[0] not in changes.maps}
            for map_id, segments in changes.maps.items():
                expected.update({(map_id, i): data for i, data in segments or ()})
            if expected != rec.segments(self.engine.graph):
                raise Divergence("a topology change rewrote a map it did not report")

    def create_volume(self, name: str, size_blocks: int) -> None:
        self.topology(lambda: self.engine.create_volume(name, size_blocks, self.block_size))
        self.model.create_volume(name, size_blocks)

    def snapshot(self, source: str, name: str) -> None:
        self.topology(lambda: self.engine.create_snapshot(source, name))
        self.model.create_snapshot(source, name)

    def refresh(self, target: str, source: str) -> None:
        self.topology(lambda: self.engine.start_refresh(target, source))
        self.model.refresh(target, source)

    def resize(self, name: str, size_blocks: int) -> bool:
        """Grows a volume if the engine lets it (False: refused, and nothing changed)."""
        before = rec.records(self.engine.graph), rec.segments(self.engine.graph)
        try:
            self.topology(lambda: self.engine.resize_volume(name, size_blocks))
        except Conflict:
            if (rec.records(self.engine.graph), rec.segments(self.engine.graph)) != before:
                raise Divergence(f"a refused resize of {name} changed the graph") from None
            return False
        self.model.resize(name, size_blocks)
        return True

    def delete(self, name: str) -> bool:
        try:
            deleted = self.topology(lambda: self.engine.delete_volume(name))
        except Conflict:
            return False
        # Freed after the delete is stored; the take is stored after they are freed.
        taken = self.topology(self.engine.take_released)
        assert set(deleted.freed_memories) <= set(taken)
        for memory in deleted.freed_memories:
            self.store.forget(memory)
        self.model.delete(name)
        return True

    def detach(self, name: str) -> bool:
        return self.topology(lambda: self.engine.detach_if_real(name))

    def finish(self, name: str) -> int:
        """Runs a volume's whole background copy and ends it; returns the blocks copied."""
        blocks = list(self.engine.blocks_to_copy(name))
        for block in blocks:
            self.background(name, block)
        if not self.detach(name):
            raise Divergence(f"{name} still reads through another volume after its copy")
        return len(blocks)

    def restart(self) -> None:
        """A controller restart: the engine is rebuilt from the stored records and the
        committed maps alone."""
        assert self.track_records, "restart needs the records"
        self.engine = MapEngine(rec.load(self.stored, rec.segments(self.engine.graph)))

    # -- block operations ---------------------------------------------------------
    def read(self, name: str, block: int) -> bytes:
        plan = self.engine.plan_read(name, block)
        # The shortcut the data path takes agrees with the plan, at every read of the model.
        assert plan.steps == (Read(self.engine.locate(name, block)),), plan
        data = self.store.run(self.engine, plan)
        assert data is not None
        return data

    def _check_family(self, name: str, plan: Plan) -> None:
        """Every memory a plan touches belongs to its volume's family: what makes locking
        (family, block) enough."""
        family = self.engine.family(name)
        graph = self.engine.graph
        members = {n.memory for n in graph.nodes.values()
                   if n.id in graph._component(family)}
        for step in plan.steps:
            for loc in (getattr(step, "source", None), getattr(step, "target", None)):
                if loc is not None and loc.memory not in members:
                    raise Divergence(f"{plan} touches {loc.memory}, outside the family of "
                                     f"{name}")
            for change in getattr(step, "changes", ()):
                owners = {n.memory for n in graph.nodes.values() if n.valid == change.map_id}
                if owners and not owners <= members:
                    raise Divergence(f"{plan} changes map {change.map_id} outside the family "
                                     f"of {name}")

    def write(self, name: str, block: int, offset: int, data: bytes,
              crash_after: int | None = None) -> Plan:
        whole = offset == 0 and len(data) == self.block_size
        plan = self.engine.plan_write(name, block, whole_block=whole)
        self._check_family(name, plan)
        old = self.model.read(name, block)
        self.model.write(name, block, offset, data)
        new = self.model.read(name, block)
        done = self._run(plan, data, offset, crash_after, (name, old, new))
        if not done:
            # The write was never acknowledged: after recovery it may read old or
            # new, and the model follows whichever it is.
            self.restart()
            got = self.read(name, block)
            if got not in (old, new):
                raise Divergence(f"after a crash in {plan}, {name}[{block}] reads {got!r}, "
                                 f"neither old {old!r} nor new {new!r}")
            self.model.volumes[name][block] = got
        return plan

    def background(self, name: str, block: int, crash_after: int | None = None) -> Plan:
        plan = self.engine.plan_background(name, block)
        self._check_family(name, plan)
        if not self._run(plan, b"", 0, crash_after, None):
            self.restart()
        return plan

    def background_run(self, name: str, first: int, count: int,
                       crash_after: int | None = None) -> CopyRun | None:
        """A run of background copies carried out as one (`plan_background_run`), checked
        against the block-by-block plans it stands for; with `crash_after`, the controller
        crashes after that many of its copies (before its commit)."""
        run = self.engine.plan_background_run(name, first, count)
        if run is None:
            return None
        valid = run.commit.changes[0].map_id
        assert run.commit.changes == (BitChange(valid, first, True, count),), run
        for block in range(first, first + count):
            expected = (Copy(Loc(run.source.memory, block), Loc(run.target.memory, block)),
                        Commit((BitChange(valid, block, True),)))
            plan = self.engine.plan_background(name, block)
            assert plan.steps == expected, (str(run), str(plan))
            self._check_family(name, plan)
        self.plans_run += 1
        for index, block in enumerate(range(first, first + count)):
            if crash_after is not None and index >= crash_after:
                self.restart()
                return run
            self.store.run(self.engine, Plan(block, (Copy(
                Loc(run.source.memory, block), Loc(run.target.memory, block)),)))
            if self.check_every_step:
                self.check_block(block)
        if crash_after is not None and crash_after == count:
            self.restart()
            return run
        self.store.run(self.engine, Plan(first, (run.commit,)))
        if self.check_every_step:
            for block in range(first, first + count):
                self.check_block(block)
        return run

    def _run(self, plan: Plan, data: bytes, offset: int, crash_after: int | None,
             written: tuple[str, bytes, bytes] | None) -> bool:
        self.plans_run += 1
        for index in range(len(plan.steps)):
            if crash_after is not None and index >= crash_after:
                return False
            self.store.run(self.engine, Plan(plan.unit, (plan.steps[index],)), data, offset)
            if self.check_every_step:
                self.check_block(plan.unit, written)
        return True

    # -- the oracle -----------------------------------------------------------------
    def check_block(self, block: int, written: tuple[str, bytes, bytes] | None = None) -> None:
        for name in self.model.volumes:
            if block >= len(self.model.volumes[name]):
                continue
            got = self.read(name, block)
            expected = self.model.read(name, block)
            if written is not None and written[0] == name:
                if got not in (written[1], written[2]):
                    raise Divergence(f"{name}[{block}] reads {got!r} mid-write; "
                                     f"expected old {written[1]!r} or new {written[2]!r}")
            elif got != expected:
                raise Divergence(f"{name}[{block}] reads {got!r}, model says {expected!r}")

    def check_all(self) -> None:
        for name, blocks in self.model.volumes.items():
            # `locate_run`, where it answers, says what `locate` says for each block.
            for first in range(len(blocks)):
                for count in range(1, len(blocks) - first + 1):
                    where = self.engine.locate_run(name, first, count)
                    if where is not None:
                        for k in range(count):
                            assert self.engine.locate(name, first + k) == Loc(
                                where.memory, where.block + k), (name, first, count, where)
            for block, expected in enumerate(blocks):
                got = self.read(name, block)
                if got != expected:
                    raise Divergence(f"{name}[{block}] reads {got!r}, model says {expected!r}")
