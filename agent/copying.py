"""A copy into an extent of this agent: from another of its extents, or pulled from a peer.

One function for both protocols that carry it (the gRPC `Copy` and the block data
port's COPY): a local copy runs in the kernel (`copy_file_range`, in a worker
thread), a peer copy pulls the data agent to agent (`agent.peer`); both are
fenced like any mutation and durable before they return when asked.
"""

from __future__ import annotations

from collections.abc import Iterable

from agent import dispatch, peer
from agent.blockstore import BlockStore
from agent.metrics import AgentMetrics
from agent.validation import RangeLike, coalesce


async def copy(store: BlockStore, peers: peer.PeerChannels, metrics: AgentMetrics,
               target_extent_id: str, source_extent_id: str, source_agent: str,
               source_data_address: str, ranges: Iterable[RangeLike], durable: bool,
               epoch: int) -> int:
    """Copies `ranges`; returns the bytes copied."""
    merged = tuple(coalesce(ranges))
    if not source_agent:
        n = await dispatch.mutate(store, epoch, store.copy_local, target_extent_id,
                                  source_extent_id, merged, durable, epoch)
        metrics.copied_bytes.labels("local").inc(n)
        return n
    return await peer.pull(peers, store, peer.PeerCopy(
        target_extent_id, source_extent_id, source_agent, merged, durable, epoch,
        source_data_address), metrics.copied_bytes.labels("peer").inc)
