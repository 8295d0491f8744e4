"""An in-memory executor of plans: memories are dicts of blocks.

It plays the controller and the agents for the engine's tests and benchmark:
it carries out a plan's steps in order and reports each commit back to the
engine, exactly as the real controller must. `run` can stop after any number
of steps to simulate a crash; whatever was copied or written up to then stays
in the memories (as it would on disk), and the engine keeps only the commits
that completed.
"""

from __future__ import annotations

from volkin.engine.engine import MapEngine
from volkin.engine.plan import Commit, Copy, Loc, Plan, Read, Write


class MemoryStore:
    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: dict[Loc, bytes] = {}
        self.copies = 0  # blocks copied, for cost checks and the benchmark

    def get(self, loc: Loc) -> bytes:
        return self.blocks.get(loc, bytes(self.block_size))

    def run(self, engine: MapEngine, plan: Plan, data: bytes = b"", offset: int = 0,
            stop_after: int | None = None) -> bytes | None:
        """Carries out `plan`; returns what a Read step read. `data` at `offset` is
        the caller's write. With `stop_after`, only that many steps run (a crash)."""
        result = None
        for index, step in enumerate(plan.steps):
            if stop_after is not None and index >= stop_after:
                break
            if isinstance(step, Copy):
                self.blocks[step.target] = self.get(step.source)
                self.copies += 1
            elif isinstance(step, Commit):
                engine.apply(step)
            elif isinstance(step, Write):
                old = self.get(step.target)
                self.blocks[step.target] = old[:offset] + data + old[offset + len(data):]
            elif isinstance(step, Read):
                result = self.get(step.source)
        return result

    def forget(self, memory: str) -> None:
        """Frees a deleted volume's memory."""
        for loc in [loc for loc in self.blocks if loc.memory == memory]:
            del self.blocks[loc]
