"""Where a call's file I/O runs: on the event loop, or in a worker thread.

A hop to a worker thread costs about a millisecond under load, far more than a
page-cache copy. So reads served from the page cache (preadv RWF_NOWAIT) and
buffered writes at the extent's current epoch run on the event loop; everything
that may wait for the device (cache-missing reads, fua, flush, copies, create,
delete, recording a new epoch) runs in a worker thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio

from agent.blockstore import BlockStore


async def write(store: BlockStore, extent_id: str, offset: int, data: bytes, fua: bool,
                epoch: int) -> int:
    if not fua:
        n = store.write_buffered_nowait(extent_id, offset, data, epoch)
        if n is not None:
            return n
    return await asyncio.to_thread(store.write, extent_id, offset, data, fua, epoch)


async def read(store: BlockStore, extent_id: str, offset: int, length: int) -> bytes:
    data = store.read_nowait(extent_id, offset, length)
    if data is not None:
        return data
    return await asyncio.to_thread(store.read, extent_id, offset, length)
