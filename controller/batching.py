"""Batching of concurrent requests: what arrives while a send is in flight rides on the next.

Group commit (many plans' map commits in one etcd transaction) and copy
batching (many plans' copies between the same two extents in one agent call
and one fsync) are the same pattern: each caller submits its item and waits;
for each key, one send is in flight at a time and carries every item that
queued while the previous one was out. Each caller returns when the send that
carried its item succeeded, or raises what that send raised: every item of a
failed send failed, and its plan must stop.

A batcher may also keep several sends of one key in flight (`in_flight`), each
carrying at most `max_items`: background copies do, so that one batch is
pulled over the network while the one before it is made durable and the one
before that is committed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Batcher(Generic[K, T]):
    def __init__(self, send: Callable[[K, list[T]], Awaitable[None]], in_flight: int = 1,
                 max_items: int = 0) -> None:
        self._send = send
        self._in_flight = in_flight
        self._max_items = max_items  # 0: no limit
        self._queues: dict[K, list[tuple[T, asyncio.Future[None]]]] = {}
        self._sending: dict[K, int] = {}  # sends of each key in flight (or about to be)

    async def submit(self, key: K, item: T) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, []).append((item, done))
        sending = self._sending.get(key, 0)
        if sending < self._in_flight:
            self._sending[key] = sending + 1
            asyncio.get_running_loop().create_task(self._flush(key))
        await done

    async def _flush(self, key: K) -> None:
        try:
            while queue := self._queues.get(key):
                take = self._max_items or len(queue)
                batch, self._queues[key] = queue[:take], queue[take:]
                try:
                    await self._send(key, [item for item, _ in batch])
                except Exception as exc:  # every caller in the batch learns why it must stop
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                else:
                    for _, done in batch:
                        if not done.done():
                            done.set_result(None)
        finally:
            # No await between finding the queue empty and this: a submit either found
            # this send still counted (and its item is taken by the loop above) or not.
            self._sending[key] -= 1
            if not self._sending[key]:
                del self._sending[key]
                if not self._queues.get(key):
                    self._queues.pop(key, None)
