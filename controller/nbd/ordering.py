"""Which requests of one NBD connection may run at the same time.

Requests of a connection run concurrently and complete out of order, as the NBD
protocol allows, with the orders a client may rely on kept:

- a request that overlaps an earlier one still in flight waits for it when either
  of them writes (write after write, read after write, write after read keep
  their order; reads of the same bytes run together);
- a FLUSH waits for every write received before it: the protocol asks it to cover
  every write the server completed before it, and waiting for the ones in flight
  too is the simple way to never miss one.

`InFlight` keeps the requests admitted and not finished; `admit` returns once a
request may start. It is plain asyncio and knows nothing of sockets.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass(eq=False)
class Entry:
    start: int
    end: int
    writes: bool
    done: asyncio.Event = field(default_factory=asyncio.Event)


class InFlight:
    def __init__(self) -> None:
        self._entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, start: int, length: int, writes: bool) -> Entry:
        """Records a request in arrival order, before any later one is registered; what
        it must wait for is what was registered before it (`wait`)."""
        entry = Entry(start, start + length, writes)
        self._entries.append(entry)
        return entry

    def register_flush(self) -> Entry:
        """A flush: ordered after every write registered before it."""
        return self.register(0, 0, writes=False)

    async def wait(self, entry: Entry, flush: bool = False) -> None:
        """Returns once every earlier request that `entry` must follow has finished."""
        earlier = self._entries[:self._entries.index(entry)]
        for other in earlier:
            if flush:
                if other.writes:
                    await other.done.wait()
            elif (other.writes or entry.writes) and other.start < entry.end \
                    and entry.start < other.end:
                await other.done.wait()

    def finish(self, entry: Entry) -> None:
        entry.done.set()
        self._entries.remove(entry)

    async def drain(self) -> None:
        """Returns once every request registered so far has finished."""
        for entry in list(self._entries):
            await entry.done.wait()
