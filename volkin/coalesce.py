"""Writes made in one turn of the event loop leave as one send.

At queue depth 16 a connection's answers (or requests) complete many per turn of
the event loop; written one by one, each costs a send() system call, which the
profiles showed as the largest single cost of both daemons (docs/performance.md).
`CoalescingWriter` queues what is written during a turn and hands it to the
transport once, at the end of the turn, in order. Large payloads are passed on
without being copied into the joined buffer.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from volkin.blockwire import Data

# Payloads at least this large are written on their own rather than joined.
JOIN_BELOW = 64 << 10


class Sink(Protocol):
    """What is written to: a `volkin.streams.Stream` (or an `asyncio.StreamWriter`)."""

    def write(self, data: Data) -> None: ...

    async def drain(self) -> None: ...

    def is_closing(self) -> bool: ...


class CoalescingWriter:
    def __init__(self, writer: Sink) -> None:
        self.writer = writer
        self._parts: list[Data] = []
        self._scheduled = False

    def write(self, data: Data) -> None:
        self._parts.append(data)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        parts, self._parts = self._parts, []
        if self.writer.is_closing():
            return
        small: list[Data] = []
        for part in parts:
            if len(part) < JOIN_BELOW:
                small.append(part)
                continue
            if small:
                self.writer.write(b"".join(small))
                small = []
            self.writer.write(part)
        if small:
            self.writer.write(b"".join(small))

    async def drain(self) -> None:
        """Waits while the transport's buffer is over its limit (what this turn wrote is
        sent at its end, as usual)."""
        await self.writer.drain()

    def is_closing(self) -> bool:
        return self.writer.is_closing()
