"""Batching of concurrent requests: what arrives while a send is in flight rides on the next.

Group commit (many plans' map commits in one etcd transaction) and copy
batching (many plans' copies between the same two extents in one agent call
and one fsync) are the same pattern: each caller submits its item and waits;
for each key, one send is in flight at a time and carries every item that
queued while the previous one was out. Each caller returns when the send that
carried its item succeeded, or raises what that send raised: every item of a
failed send failed, and its plan must stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class Batcher(Generic[K, T]):
    def __init__(self, send: Callable[[K, list[T]], Awaitable[None]]) -> None:
        self._send = send
        self._queues: dict[K, list[tuple[T, asyncio.Future[None]]]] = {}

    async def submit(self, key: K, item: T) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = [(item, done)]
            asyncio.get_running_loop().create_task(self._flush(key))
        else:
            queue.append((item, done))
        await done

    async def _flush(self, key: K) -> None:
        while self._queues.get(key):
            batch, self._queues[key] = self._queues[key], []
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
        self._queues.pop(key, None)
