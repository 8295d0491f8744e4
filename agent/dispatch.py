"""Where a call's file I/O runs: on the event loop, or in a worker thread.

A hop to a worker thread costs about a millisecond under load, far more than a
page-cache copy. So reads served from the page cache (preadv RWF_NOWAIT) and
buffered writes at the node's current epoch, while the agent is valid and no gate
is held exclusive, run on the event loop; everything that may wait (cache-missing
reads, fua, flush, copies, create, delete, recording a new epoch, waiting for the
agent to become valid again) runs in a worker thread (`asyncio.to_thread`);
waiting for validity happens on the event loop first, so it holds no thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from agent.blockstore import BlockStore
from volkin.blockwire import Data, Received

P = ParamSpec("P")
T = TypeVar("T")


async def mutate(store: BlockStore, epoch: int, call: Callable[P, T], *args: P.args,
                 **kwargs: P.kwargs) -> T:
    """Runs a mutation at `epoch` in a worker thread, once the fence would admit it. An
    older epoch is refused at once; while the agent cannot prove its validity the call
    waits here, on the event loop, so an etcd outage does not fill the thread pool
    that cache-missing reads need."""
    await store.fence.ready(epoch)
    return await asyncio.to_thread(call, *args, **kwargs)


async def write(store: BlockStore, extent_id: str, offset: int, data: Data, fua: bool,
                epoch: int) -> int:
    if not fua:
        n = store.write_buffered_nowait(extent_id, offset, data, epoch)
        if n is not None:
            return n
    return await mutate(store, epoch, store.write, extent_id, offset, data, fua, epoch)


async def read(store: BlockStore, extent_id: str, offset: int, length: int) -> Received:
    data = store.read_nowait(extent_id, offset, length)
    if data is not None:
        return data
    return await asyncio.to_thread(store.read, extent_id, offset, length)
