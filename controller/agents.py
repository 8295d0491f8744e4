"""The one agent client: channels, limits, reconnection, retries, fencing and error translation.

Every call the controller makes to an agent goes through `AgentClient`, named by
the agent's node id; the address comes from the agent's registration in etcd
(`AgentDirectory`) and is looked up again when the agent stops answering, so an
agent that restarts on another port is found again.

A call waits, bounded, for an agent that is restarting: transient failures
(UNAVAILABLE, a deadline, a broken stream) are retried with a short backoff for
up to `io_wait` seconds (less inside a background job, see `CALL_BUDGET`), and
every call the agents take is idempotent (the same write, copy, create, resize, delete
or flush again gives the same result while the caller holds the block's lock). Past
the bound the call fails with `Unavailable`, one readable line.

Fencing: no call starts unless the term's fence is valid (`Fence.ready`, which
waits through a short etcd blip), and every mutation carries the term's epoch.
An agent that refuses the epoch has seen a newer controller: the term is deposed
at once. `fence_all` is what a new term does before it serves anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc

from controller.fence import Deposed, Fence
from volkin import blockwire as w
from volkin.api.v1 import agent_pb2, agent_pb2_grpc
from volkin.blockclient import AgentConnections
from volkin.errors import FencedOut, NotFound, Unavailable, VolkinError
from volkin.etcd import Etcd, EtcdUnavailable
from volkin.keys import Keys
from volkin.log import event
from volkin.rpc_status import error_from_agent

_log = logging.getLogger("controller.agents")
T = TypeVar("T")

MAX_MESSAGE = 8 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # A restarted agent is usually back within a second or two: try again soon
    # instead of waiting out gRPC's default backoff (up to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
RETRY_PAUSE = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
DIRECTORY_REFRESH = 0.2  # at most this often, seconds, when an agent cannot be found
# Seconds a call may retry, if less than io_wait: a background job sets it lower so
# that it reports `waiting` soon instead of holding a block's lock for long.
CALL_BUDGET: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "agent_call_budget", default=None)
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED)


class AgentDirectory:
    """Node id -> registration record of the agents registered in etcd."""

    def __init__(self, etcd: Etcd | None, keys: Keys,
                 static: dict[str, str] | None = None) -> None:
        self._etcd = etcd
        self._keys = keys
        self.records: dict[str, dict[str, object]] = {
            node: {"node_id": node, "address": address} for node, address in (static or {}).items()}
        self._refreshed = 0.0
        self._refreshing: asyncio.Lock | None = None

    async def refresh(self) -> dict[str, dict[str, object]]:
        """Reads every registration now."""
        if self._etcd is None:
            return self.records
        found = await self._etcd.get_prefix(self._keys.agents)
        records = {}
        for raw in found.values():
            try:
                record = json.loads(raw)
                records[str(record["node_id"])] = record
            except (ValueError, KeyError, TypeError):
                continue  # not ours to judge; a broken record is simply not an agent
        self.records = records
        self._refreshed = time.monotonic()
        return records

    def nodes(self) -> list[str]:
        return sorted(self.records)

    async def address(self, node: str, fresh: bool = False) -> str:
        """The gRPC address of `node`; with `fresh`, read again from etcd (rate-limited)."""
        return str((await self.record(node, fresh))["address"])

    async def record(self, node: str, fresh: bool = False) -> dict[str, object]:
        """The registration of `node`; with `fresh`, read again from etcd (rate-limited)."""
        if self._etcd is not None and (fresh or node not in self.records):
            if self._refreshing is None:
                self._refreshing = asyncio.Lock()
            async with self._refreshing:
                if time.monotonic() - self._refreshed >= DIRECTORY_REFRESH:
                    try:
                        await self.refresh()
                    except EtcdUnavailable as exc:
                        raise Unavailable(f"agent {node}: its address cannot be looked up: "
                                          f"{exc.message}") from exc
        record = self.records.get(node)
        if record is None:
            raise Unavailable(f"agent {node} is not registered (is volkin-agent running there?)")
        return record


class AgentClient:
    def __init__(self, directory: AgentDirectory, fence: Fence, io_wait: float = 30.0) -> None:
        self.directory = directory
        self.fence = fence
        self.io_wait = io_wait
        self._connections = AgentConnections(CHANNEL_OPTIONS)
        # node id -> (what went wrong, since when): cleared by the next success.
        self.troubles: dict[str, tuple[str, float]] = {}

    async def close(self) -> None:
        await self._connections.close()

    async def _data_call(self, node: str, what: str, op: w.Op, extent_id: str,
                         offset: int = 0, length: int = 0, flags: w.Flag = w.NO_FLAGS,
                         data: w.Data = b"") -> w.Received:
        """One request on the agent's block data port (its gRPC twin for an agent that
        registered no data port)."""
        async def attempt(record: dict[str, object], timeout: float) -> w.Received:
            address = str(record.get("data_address") or "")
            if not address:
                return await self._grpc_data(record, op, extent_id, offset, length, flags,
                                             data, timeout)
            return await self._connections.data(address).call(
                op, extent_id, offset, length, self.fence.epoch, flags, data, timeout)
        return await self._call(node, what, attempt)

    async def _grpc_data(self, record: dict[str, object], op: w.Op, extent_id: str,
                         offset: int, length: int, flags: w.Flag, data: w.Data,
                         timeout: float) -> w.Received:
        stub = self._grpc(record)
        epoch = self.fence.epoch
        if op == w.Op.READ:
            out = bytearray()
            async for chunk in stub.Read(agent_pb2.ReadRequest(
                    extent_id=extent_id, offset=offset, length=length), timeout=timeout):
                out += chunk.data
            return bytes(out)
        if op == w.Op.WRITE:
            await stub.Write(agent_pb2.WriteRequest(
                extent_id=extent_id, offset=offset, data=bytes(data), fua=bool(flags & w.Flag.FUA),
                epoch=epoch), timeout=timeout)
        elif op == w.Op.FLUSH:
            await stub.Flush(agent_pb2.FlushRequest(extent_id=extent_id, epoch=epoch),
                             timeout=timeout)
        elif op == w.Op.ZERO:
            await stub.Zero(agent_pb2.ZeroRequest(
                extent_id=extent_id, offset=offset, length=length,
                punch_hole=bool(flags & w.Flag.PUNCH_HOLE), fua=bool(flags & w.Flag.FUA),
                epoch=epoch), timeout=timeout)
        elif op == w.Op.MAP:  # no gRPC twin: everything counts as data, which is safe
            return w.encode_map([(offset, length)])
        else:
            raise ValueError(f"no gRPC twin for data operation {op!r}")
        return b""

    def _grpc(self, record: dict[str, object]) -> agent_pb2_grpc.BlockStoreStub:
        return self._connections.stub(str(record["address"]))

    # -- the calls -------------------------------------------------------------------
    async def create_extent(self, node: str, extent_id: str, size_bytes: int,
                            block_size: int) -> None:
        request = agent_pb2.CreateExtentRequest(extent_id=extent_id, size_bytes=size_bytes,
                                                block_size=block_size, epoch=self.fence.epoch)
        await self._call(node, "create an extent", lambda record, timeout: self._grpc(
            record).CreateExtent(request, timeout=timeout))

    async def resize_extent(self, node: str, extent_id: str, size_bytes: int) -> None:
        """Grows an extent (the same size again is fine; a smaller one is refused)."""
        request = agent_pb2.ResizeExtentRequest(extent_id=extent_id, size_bytes=size_bytes,
                                                epoch=self.fence.epoch)
        await self._call(node, "grow an extent", lambda record, timeout: self._grpc(
            record).ResizeExtent(request, timeout=timeout))

    async def allocated_bytes(self, node: str, extent_id: str) -> int:
        """Bytes the extent holds on the agent's disk; 0 if it was never created."""
        try:
            extent = await self._call(node, "stat an extent", lambda record, timeout: self._grpc(
                record).StatExtent(agent_pb2.StatExtentRequest(extent_id=extent_id),
                                   timeout=timeout))
        except NotFound:
            return 0
        return int(extent.allocated_bytes)

    async def delete_extent(self, node: str, extent_id: str) -> None:
        """Deletes an extent; one that does not exist (never created) is fine."""
        with contextlib.suppress(NotFound):
            request = agent_pb2.DeleteExtentRequest(extent_id=extent_id, epoch=self.fence.epoch)
            await self._call(node, "delete an extent", lambda record, timeout: self._grpc(
                record).DeleteExtent(request, timeout=timeout))

    async def write(self, node: str, extent_id: str, offset: int, data: w.Data,
                    fua: bool) -> None:
        for start in range(0, len(data), w.MAX_DATA):
            await self._data_call(node, "write", w.Op.WRITE, extent_id, offset + start,
                                  flags=w.Flag.FUA if fua else w.NO_FLAGS,
                                  data=data[start:start + w.MAX_DATA])

    async def flush(self, node: str, extent_id: str) -> None:
        await self._data_call(node, "flush", w.Op.FLUSH, extent_id)

    async def data_ranges(self, node: str, extent_id: str, offset: int,
                          length: int) -> list[tuple[int, int]]:
        """Where [offset, offset + length) of the extent holds data; the rest reads as
        zeros (holes of the agent's file)."""
        answer = await self._data_call(node, "map", w.Op.MAP, extent_id, offset, length)
        try:
            return w.decode_map(answer)
        except w.WireError as exc:
            raise Unavailable(f"agent {node} answered a map with {exc}") from exc

    async def zero(self, node: str, extent_id: str, offset: int, length: int,
                   fua: bool, punch: bool = False) -> None:
        """Makes the range read as zeros on the agent (fallocate: no payload moves);
        with `punch` its space is freed too."""
        flags = (w.Flag.FUA if fua else w.NO_FLAGS) | (w.Flag.PUNCH_HOLE if punch
                                                       else w.NO_FLAGS)
        await self._data_call(node, "zero", w.Op.ZERO, extent_id, offset, length,
                              flags=flags)

    async def copy(self, node: str, target_extent: str, source_extent: str, source_node: str,
                   ranges: Sequence[agent_pb2.CopyRange]) -> None:
        """Copies `ranges` into `target_extent` on `node`, from `source_extent` on the same
        agent (`source_node` == `node`) or pulled from the source agent; durable."""
        async def call(record: dict[str, object], timeout: float) -> object:
            source_agent = source_data = ""
            if source_node != node:
                source = await self.directory.record(source_node)
                source_agent = str(source["address"])
                source_data = str(source.get("data_address") or "")
            data_address = str(record.get("data_address") or "")
            if data_address:  # the block data port: no gRPC round trip
                spec = w.CopySpec(source_extent, source_agent, source_data, tuple(
                    (r.source_offset, r.target_offset, r.length) for r in ranges))
                return await self._connections.data(data_address).call(
                    w.Op.COPY, target_extent, epoch=self.fence.epoch,
                    data=w.encode_copy(spec), timeout=timeout)
            return await self._grpc(record).Copy(agent_pb2.CopyRequest(
                target_extent_id=target_extent, source_extent_id=source_extent,
                source_agent=source_agent, ranges=ranges, durable=True,
                epoch=self.fence.epoch, source_data_address=source_data), timeout=timeout)
        # A pull that waits for its source shows as the target's slowness: name both.
        await self._call(node, "copy" if source_node == node else f"copy from agent {source_node}",
                         call)

    async def read(self, node: str, extent_id: str, offset: int, length: int) -> w.Received:
        if length <= w.MAX_DATA:  # one request: its payload as it came
            return await self._read_part(node, extent_id, offset, length)
        return b"".join([await self._read_part(node, extent_id, offset + start,
                                               min(w.MAX_DATA, length - start))
                         for start in range(0, length, w.MAX_DATA)])

    async def _read_part(self, node: str, extent_id: str, offset: int, n: int) -> w.Received:
        part = await self._data_call(node, "read", w.Op.READ, extent_id, offset, n)
        if len(part) != n:
            raise Unavailable(f"agent {node} answered a read of {n} bytes with {len(part)}")
        return part

    async def fence_node(self, node: str) -> int:
        """Raises `node`'s epoch to this term's; returns the agent's epoch."""
        response = await self._call(node, "fence", lambda record, timeout: self._grpc(record).Fence(
            agent_pb2.FenceRequest(epoch=self.fence.epoch), timeout=timeout))
        return int(response.epoch)

    # -- retries, fencing, translation ----------------------------------------------------
    async def _call(self, node: str, what: str,
                    call: Callable[[dict[str, object], float], Awaitable[T]]) -> T:
        """Runs `call` (with the agent's registration and a timeout) until it succeeds,
        retrying what is transient for up to the call's budget; translates errors."""
        budget = self.io_wait
        limit = CALL_BUDGET.get()
        if limit is not None:
            budget = min(budget, limit)
        started = time.monotonic()
        end = started + budget
        attempt = 0
        fresh = False
        while True:
            if not self.fence.valid():  # (an await only when there is something to wait for)
                await self.fence.ready(max(0.0, end - time.monotonic()))
            address = "?"
            try:
                record = None if fresh else self.directory.records.get(node)
                if record is None:
                    record = await self.directory.record(node, fresh)
                address = str(record.get("address", "?"))
                result = await call(record, max(0.05, end - time.monotonic()))
            except FencedOut as exc:  # from the data port: a newer controller took over
                self.fence.depose(f"agent {node} has seen a newer controller: {exc.message}")
                raise Deposed(f"this controller is no longer the active one: "
                              f"{self.fence.reason}") from exc
            except grpc.aio.AioRpcError as exc:
                error = error_from_agent(exc.code(), f"agent {node} ({address}) could not "
                                                   f"{what}: {_one_line(exc.details())}")
                if isinstance(error, FencedOut):
                    self.fence.depose(f"agent {node} has seen a newer controller: "
                                      f"{_one_line(exc.details())}")
                    raise Deposed(f"this controller is no longer the active one: "
                                  f"{self.fence.reason}") from exc
                if exc.code() not in _RETRYABLE:
                    raise error from exc
                last: VolkinError = error
            except Unavailable as exc:  # named after the agent, whatever said it
                last = exc if exc.message.startswith(f"agent {node}") else Unavailable(
                    f"agent {node} ({address}) could not {what}: {exc.message}")
            else:
                if node in self.troubles:
                    _, since = self.troubles.pop(node)
                    event(_log, "agent.reachable", node=node, address=address,
                          waited=f"{time.monotonic() - since:.2f}")
                return result
            now = time.monotonic()
            if node not in self.troubles:
                event(_log, "agent.retrying", logging.WARNING, node=node, address=address,
                      error=last.message)
            self.troubles[node] = (last.message, self.troubles.get(node, ("", now))[1])
            if now >= end:
                raise Unavailable(f"{last.message} (retried for {budget:g} s)")
            await asyncio.sleep(min(RETRY_PAUSE[min(attempt, len(RETRY_PAUSE) - 1)],
                                    max(0.0, end - now)))
            attempt += 1
            fresh = True  # it may have come back elsewhere

    # -- a new term --------------------------------------------------------------------
    async def fence_all(self, etcd: Etcd | None, margin: float = 1.0) -> None:
        """Makes sure no agent accepts a mutation older than this term's epoch: every
        registered agent is fenced directly, or shows the epoch in its registration, or
        its registration is gone, or its registration's TTL (plus `margin`) has passed
        since the listing, after which it cannot accept anything without first reading
        the new epoch from etcd (the agent's validity rule, docs/agent.md)."""
        listed = time.monotonic()
        records = await self.directory.refresh() if etcd is not None else self.directory.records
        deadline = {node: listed + float(str(r.get("lease_ttl", 10))) + margin
                    for node, r in records.items()}
        pending = set(records)
        epoch = self.fence.epoch

        async def fence_one(node: str) -> None:
            token = CALL_BUDGET.set(max(0.1, deadline[node] - time.monotonic()))
            try:
                await self.fence_node(node)
            except Unavailable:
                return  # the registration or the deadline decides
            finally:
                CALL_BUDGET.reset(token)
            pending.discard(node)

        tasks = [asyncio.create_task(fence_one(node)) for node in sorted(pending)]
        try:
            while pending:
                self.fence.check()
                if etcd is not None:
                    try:
                        now_records = await self.directory.refresh()
                    except EtcdUnavailable:
                        now_records = None
                    if now_records is not None:
                        for node in list(pending):
                            record = now_records.get(node)
                            if record is None or int(str(record.get("epoch", 0))) >= epoch:
                                pending.discard(node)
                for node in list(pending):
                    if time.monotonic() >= deadline[node]:
                        pending.discard(node)
                        event(_log, "agent.fence_waited", logging.WARNING, node=node,
                              reason="unreachable; its registration TTL has passed")
                if pending:
                    await asyncio.wait(tasks, timeout=0.2)
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Deposed):
                raise result
        event(_log, "controller.fenced", epoch=epoch, agents=len(records),
              waited=f"{time.monotonic() - listed:.2f}")


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())
