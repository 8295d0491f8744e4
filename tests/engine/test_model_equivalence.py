"""Random interleavings of every operation agree with the reference model, crashes included.

A hypothesis state machine creates volumes, snapshots (of snapshots), refreshes
between unrelated and related volumes (restore, chains V3 <- V2 <- V1, refresh
while a snapshot is virtual, snapshot during a refresh), partial and whole-block
writes, background steps, detaches, deletes, controller restarts and crashes
between any two plan steps. After every plan step the committed maps must give
every volume the contents the model gives it (the harness checks this), and a
crash followed by recovery from the committed maps alone must lose no
acknowledged write.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.engine.harness import Harness
from volkin.engine import Conflict

BLOCK = 8
BLOCKS = 3
GROWN = 5  # a volume grows up to this many blocks
NAMES = [f"v{i}" for i in range(5)]


class EngineVersusModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(block_size=BLOCK)
        self.serial = 0

    def _existing(self, index: int) -> str:
        names = sorted(self.h.model.volumes)
        return names[index % len(names)]

    def _free_name(self) -> str | None:
        free = [n for n in NAMES if n not in self.h.model.volumes]
        return free[0] if free else None

    def _data(self, length: int) -> bytes:
        self.serial += 1
        return bytes((self.serial + i) % 251 + 1 for i in range(length))

    def _note(self, steps: tuple[object, ...], crash_after: int | None) -> None:
        if crash_after is not None and crash_after < len(steps):
            event("crash inside a plan")
        if any("~" in str(step) for step in steps):
            event("a spill memory used")
        if sum(1 for step in steps if type(step).__name__ == "Commit") > 1:
            event("plan with several commits")

    @initialize()
    def two_unrelated_volumes(self) -> None:
        self.h.create_volume("v0", BLOCKS)
        self.h.create_volume("v1", BLOCKS)

    @precondition(lambda self: len(self.h.model.volumes) < len(NAMES))
    @rule()
    def create_volume(self) -> None:
        name = self._free_name()
        assert name is not None
        self.h.create_volume(name, BLOCKS)

    @precondition(lambda self: 0 < len(self.h.model.volumes) < len(NAMES))
    @rule(source=st.integers(0, 20))
    def snapshot(self, source: int) -> None:
        name = self._free_name()
        assert name is not None
        self.h.snapshot(self._existing(source), name)

    @precondition(lambda self: len(self.h.model.volumes) >= 2)
    @rule(into=st.integers(0, 20), source=st.integers(0, 20))
    def refresh(self, into: int, source: int) -> None:
        t, s = self._existing(into), self._existing(source)
        if t == s:
            return
        if len(self.h.model.volumes[t]) != len(self.h.model.volumes[s]):
            with pytest.raises(Conflict, match="sizes differ"):
                self.h.refresh(t, s)
            event("a refresh between volumes of different sizes refused")
            return
        self.h.refresh(t, s)

    @precondition(lambda self: len(self.h.model.volumes) > 0)
    @rule(volume=st.integers(0, 20), more=st.integers(0, GROWN - BLOCKS))
    def resize(self, volume: int, more: int) -> None:
        name = self._existing(volume)
        size = min(len(self.h.model.volumes[name]) + more, GROWN)
        event("a volume grown" if self.h.resize(name, size) else "a resize refused")

    @precondition(lambda self: len(self.h.model.volumes) > 0)
    @rule(volume=st.integers(0, 20), block=st.integers(0, GROWN - 1),
          span=st.tuples(st.integers(0, BLOCK - 1), st.integers(1, BLOCK)),
          crash_after=st.none() | st.integers(0, 12))
    def write(self, volume: int, block: int, span: tuple[int, int],
              crash_after: int | None) -> None:
        offset = span[0]
        length = min(span[1], BLOCK - offset)
        name = self._existing(volume)
        block %= len(self.h.model.volumes[name])
        plan = self.h.write(name, block, offset, self._data(length), crash_after)
        self._note(plan.steps, crash_after)

    @precondition(lambda self: len(self.h.model.volumes) > 0)
    @rule(volume=st.integers(0, 20), block=st.integers(0, GROWN - 1),
          crash_after=st.none() | st.integers(0, 8))
    def whole_block_write(self, volume: int, block: int, crash_after: int | None) -> None:
        name = self._existing(volume)
        block %= len(self.h.model.volumes[name])
        plan = self.h.write(name, block, 0, self._data(BLOCK), crash_after)
        self._note(plan.steps, crash_after)

    @precondition(lambda self: len(self.h.model.volumes) > 0)
    @rule(volume=st.integers(0, 20), block=st.integers(0, BLOCKS - 1),
          crash_after=st.none() | st.integers(0, 8))
    def background_step(self, volume: int, block: int, crash_after: int | None) -> None:
        plan = self.h.background(self._existing(volume), block, crash_after)
        self._note(plan.steps, crash_after)

    @precondition(lambda self: len(self.h.model.volumes) > 0)
    @rule(volume=st.integers(0, 20), first=st.integers(0, BLOCKS - 1),
          count=st.integers(1, BLOCKS), crash_after=st.none() | st.integers(0, BLOCKS))
    def background_run(self, volume: int, first: int, count: int,
                       crash_after: int | None) -> None:
        count = min(count, BLOCKS - first)
        run = self.h.background_run(self._existing(volume), first, count, crash_after)
        if run is not None:
            event(f"a background run of {count} block(s)")

    @precondition(lambda self: len(self.h.model.volumes) > 0)
    @rule(volume=st.integers(0, 20))
    def finish_background_copy(self, volume: int) -> None:
        name = self._existing(volume)
        self.h.finish(name)
        assert self.h.engine.info(name).source is None

    @precondition(lambda self: len(self.h.model.volumes) > 1)
    @rule(volume=st.integers(0, 20))
    def delete(self, volume: int) -> None:
        self.h.delete(self._existing(volume))

    @rule()
    def restart_controller(self) -> None:
        self.h.restart()

    @invariant()
    def every_read_matches_the_model(self) -> None:
        self.h.check_all()


def _settings(examples: int, steps: int) -> settings:
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


TestEngineVersusModelQuick = EngineVersusModel.TestCase
TestEngineVersusModelQuick.settings = _settings(60, 30)


class EngineVersusModelLong(EngineVersusModel):
    pass


TestEngineVersusModelThousands = pytest.mark.slow(EngineVersusModelLong.TestCase)
TestEngineVersusModelThousands.settings = _settings(3000, 40)
