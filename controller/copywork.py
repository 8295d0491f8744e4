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

A run that finds more data in its source than RUN_DATA is not carried out but
cut the same way (`finish`); one that finds more than half its size data hands
its blocks out one by one. A client's read or write of a block in a run waits
for the whole run, so a run holds little data; and where the data is dense,
copying block by block is what
the agents and the group commit are tuned for (measured: runs of dense 2 MiB
moved a 1 GiB refresh at 0.44 of nbdcopy, blocks at 0.70, in one run of
bench.datapath).

The walk is lazy: a 1 PiB target does not become a list of block numbers.
"""

from __future__ import annotations

import asyncio
import collections

from controller.executor import RunResult
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
        self._block_size = volume.block_size
        self.min_run = max(1, MIN_RUN_BYTES // volume.block_size)
        self._next_chunk = 0
        self._pending: collections.deque[Item] = collections.deque()
        self._runs_out = 0  # runs handed out and not finished
        self._changed = asyncio.Event()

    async def next(self) -> Item | None:
        """The next block or run to copy; None when the walk is over. A run handed out may
        come back cut smaller (`finish`), so while one is out, an empty line waits."""
        while True:
            while not self._pending and self._next_chunk < self._size:
                first = self._next_chunk
                self._next_chunk = min(self._size, first + RUN_BLOCKS)
                self._pending.extend(self._decide(first, self._next_chunk - first))
            if self._pending:
                item = self._pending.popleft()
                if isinstance(item, tuple):
                    self._runs_out += 1
                elif self._engine.own_run(self._name, item, 1) is not False:
                    continue  # a client's write copied it since it was put in line
                return item
            if not self._runs_out:
                return None
            self._changed.clear()
            await self._changed.wait()

    def finish(self, first: int, count: int, result: RunResult | None) -> None:
        """A run handed out is done, or was not carried out: its blocks go first in line
        one by one if it is dense or small, else its parts are asked again (no longer a
        run, or just too much data for one)."""
        self._runs_out -= 1
        if result is None or not result.done:
            dense = result is not None and 2 * result.data > count * self._block_size
            items = (self._blocks(first, first + count) if dense or count <= self.min_run
                     else self._split(first, count))
            self._pending.extendleft(reversed(items))
        self._changed.set()

    def max_data(self, count: int) -> int:
        """The most data a run of `count` blocks may copy before it is cut smaller."""
        return min(RUN_DATA, count * self._block_size // 2)

    def _decide(self, first: int, count: int) -> list[Item]:
        if self._engine.own_run(self._name, first, count):
            return []  # every block is the volume's own already
        if count <= self.min_run:
            return self._blocks(first, first + count)
        if self._engine.plan_background_run(self._name, first, count) is not None:
            return [(first, count)]
        return self._split(first, count)

    def _split(self, first: int, count: int) -> list[Item]:
        return [item for start, n in _parts(first, count) for item in self._decide(start, n)]

    def _blocks(self, first: int, stop: int) -> list[Item]:
        # Bit by bit: a walk of the map from `first` (`blocks_to_copy`) would cost its whole
        # segment each time, and this is asked for many small ranges of one segment.
        return [block for block in range(first, stop)
                if self._engine.own_run(self._name, block, 1) is False]


def _parts(first: int, count: int) -> list[tuple[int, int]]:
    size = -(-count // RUN_FANOUT)
    return [(start, min(size, first + count - start))
            for start in range(first, first + count, size)]
