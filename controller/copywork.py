"""What a background job copies next: runs of blocks where it can, single blocks elsewhere.

A job's workers share one `CopyWork`. It walks the target in chunks of one map
segment (RUN_BLOCKS) and asks the engine (pure, a few operations per segment):

- blocks already the target's own are skipped;
- a chunk the engine plans as one run (`MapEngine.plan_background_run`) is handed
  out as a run: the shell copies what the source holds in it and punches the
  rest, and commits every block's bit at once, so a run of holes costs a few
  agent calls and one commit however many blocks it has;
- any other chunk is cut in RUN_FANOUT parts and each is asked again, down to
  parts of MIN_RUN_BYTES, whose blocks are handed out one by one (the plan of
  each block then decides, as before runs existed).

A run that finds more than RUN_DATA bytes of data in its source is not carried
out but cut the same way (`refine`): a client's read or write of a block in a
run waits for the whole run, so a run holds little data, unless it is already as
small as MIN_RUN_BYTES.

The walk is lazy: a 1 PiB target does not become a list of block numbers.
"""

from __future__ import annotations

import collections

from volkin.engine import MapEngine
from volkin.engine.bitmap import SEGMENT_BITS

RUN_BLOCKS = SEGMENT_BITS
RUN_FANOUT = 8
MIN_RUN_BYTES = 4 << 20
RUN_DATA = 4 << 20

Item = int | tuple[int, int]  # a block, or a run (first block, count)


class CopyWork:
    def __init__(self, engine: MapEngine, name: str) -> None:
        self._engine = engine
        self._name = name
        volume = engine.volume(name)
        self._size = volume.size_blocks
        self.min_run = max(1, MIN_RUN_BYTES // volume.block_size)
        self._next_chunk = 0
        self._pending: collections.deque[Item] = collections.deque()

    def next(self) -> Item | None:
        """The next block or run to copy; None when the walk is over."""
        while not self._pending:
            if self._next_chunk >= self._size:
                return None
            first = self._next_chunk
            self._next_chunk = min(self._size, first + RUN_BLOCKS)
            self._expand(first, self._next_chunk - first)
        return self._pending.popleft()

    def max_data(self, count: int) -> int | None:
        """The most data a run of `count` blocks may copy before it is cut smaller."""
        return None if count <= self.min_run else RUN_DATA

    def refine(self, first: int, count: int) -> None:
        """A run that was not carried out (no longer one, or too much data): its parts go
        first in line."""
        if count <= self.min_run:
            self._pending.extendleft(reversed(self._blocks(first, first + count)))
            return
        parts: list[Item] = []
        for start, n in _parts(first, count):
            parts += self._decide(start, n)
        self._pending.extendleft(reversed(parts))

    def _expand(self, first: int, count: int) -> None:
        self._pending.extend(self._decide(first, count))

    def _decide(self, first: int, count: int) -> list[Item]:
        if self._engine.own_run(self._name, first, count):
            return []  # every block is the volume's own already
        if self._engine.plan_background_run(self._name, first, count) is not None:
            return [(first, count)]
        if count <= self.min_run:
            return list(self._blocks(first, first + count))
        items: list[Item] = []
        for start, n in _parts(first, count):
            items += self._decide(start, n)
        return items

    def _blocks(self, first: int, stop: int) -> list[Item]:
        blocks: list[Item] = []
        for block in self._engine.blocks_to_copy(self._name, first):
            if block >= stop:
                break
            blocks.append(block)
        return blocks


def _parts(first: int, count: int) -> list[tuple[int, int]]:
    size = -(-count // RUN_FANOUT)
    return [(start, min(size, first + count - start))
            for start in range(first, first + count, size)]
