"""The agent's registration in etcd, and the renewals that keep it admitting mutations.

    {prefix}/agents/{node_id} = {"node_id", "address", "metrics_address", "pid",
                                 "version", "epoch", "lease_ttl"}

The controller lists the prefix to discover agents and sees an agent die when its
lease expires `lease_ttl` seconds after the last renewal. Every cycle, in this order:

1. note the monotonic time t, *before* anything is sent;
2. renew the lease (or grant a new one and put the record under it);
3. read the controller's fencing epoch (`{prefix}/controller/epoch`) and raise the
   node's epoch to it, durably, after every older mutation in flight has finished;
4. only then tell the fence that the agent is valid until t + lease_ttl - margin
   (`agent.fencing`): a new leader that raised the epoch before t cannot have missed
   this agent, and one that raises it later is seen by the next cycle's read;
5. put the record back if it changed (its epoch) or someone deleted it.

Reads are served whether or not etcd is reachable; mutations only while step 4 holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, replace

from agent.fencing import Clock, NodeFence
from volkin.errors import VolkinError
from volkin.etcd import Etcd, EtcdUnavailable, LeaseLost
from volkin.keys import Keys
from volkin.log import event

_log = logging.getLogger("agent.registry")


@dataclass(frozen=True)
class AgentRecord:
    """What the agent publishes about itself."""

    node_id: str
    address: str
    metrics_address: str
    pid: int
    version: str
    # The node's fencing epoch: a controller waiting for an agent it cannot reach
    # knows it is fenced once this shows the new epoch.
    epoch: int
    # Seconds the lease lives without renewal: how long after its last renewal the
    # agent may still admit mutations (less a margin).
    lease_ttl: int
    # host:port of the block data port (reads and writes; volkin.blockwire).
    data_address: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def parse_epoch(raw: bytes | None) -> int:
    """The controller's fencing epoch as stored in etcd: decimal ASCII, absent = 0."""
    if raw is None:
        return 0
    try:
        epoch = int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        epoch = -1
    if epoch < 0:
        raise VolkinError(f"the controller's fencing epoch in etcd is {raw[:40]!r}, "
                          "not a decimal number")
    return epoch


class Registration:
    """Keeps `record` at its key under a lease and proves the agent's validity after
    each renewal; re-registers whenever the lease is lost."""

    def __init__(self, etcd: Etcd, keys: Keys, record: AgentRecord, fence: NodeFence,
                 clock: Clock = time.monotonic) -> None:
        self._etcd = etcd
        self._key = keys.agent(record.node_id)
        self._epoch_key = keys.epoch
        self._record = record
        self._ttl = record.lease_ttl
        self._fence = fence
        self._clock = clock
        self._lease = 0
        self.registered = asyncio.Event()

    def _value(self) -> bytes:
        return replace(self._record, epoch=self._fence.epoch).encode()

    async def run(self) -> None:
        """Registers, then renews every ttl/3 seconds, until cancelled."""
        interval = max(self._ttl / 3, 0.2)
        outage = False
        while True:
            started = self._clock()
            try:
                if not self._lease:
                    lease = await self._etcd.grant_lease(self._ttl)
                    await self._etcd.put(self._key, self._value(), lease)
                    self._lease = lease
                    self.registered.set()
                    event(_log, "agent.registered", key=self._key, lease=f"{lease:x}",
                          ttl=self._ttl)
                else:
                    await self._etcd.keep_alive(self._lease)
                await self._learn_epoch()
                self._fence.validity.proved(started, self._ttl)
                await self._publish()
                if outage:
                    outage = False
                    event(_log, "agent.etcd_reachable", key=self._key)
            except LeaseLost:
                event(_log, "agent.lease_lost", logging.WARNING, key=self._key,
                      lease=f"{self._lease:x}")
                self._fence.validity.lease_lost()
                self._lease = 0
                self.registered.clear()
                continue
            except EtcdUnavailable as exc:
                if not outage:
                    outage = True
                    event(_log, "agent.etcd_unreachable", logging.WARNING, key=self._key,
                          error=exc.message)
            except VolkinError as exc:
                # An unreadable epoch key, or a data disk that cannot record the epoch:
                # the cycle proves nothing, and mutations wait for one that does.
                event(_log, "agent.renewal_failed", logging.ERROR, key=self._key,
                      error=exc.message)
            await asyncio.sleep(interval)

    async def _learn_epoch(self) -> None:
        epoch = parse_epoch(await self._etcd.get(self._epoch_key))
        if epoch > self._fence.epoch:
            # Waits for older mutations in flight and fsyncs: not on the event loop.
            await asyncio.to_thread(self._fence.raise_to, epoch, "etcd")

    async def _publish(self) -> None:
        # The epoch may have changed; someone may have deleted the key.
        value = self._value()
        if await self._etcd.get(self._key) != value:
            await self._etcd.put(self._key, value, self._lease)
            event(_log, "agent.record_updated", key=self._key, epoch=self._fence.epoch)

    async def withdraw(self) -> None:
        """Revokes the lease so the controller sees the agent go at once (best effort).
        Call it only once the fence admits nothing more (`NodeFence.close`): a new
        leader will not fence an agent it no longer finds."""
        if not self._lease:
            return
        try:
            await self._etcd.revoke_lease(self._lease)
            event(_log, "agent.deregistered", key=self._key)
        except EtcdUnavailable as exc:
            event(_log, "agent.deregister_failed", logging.WARNING, key=self._key,
                  error=exc.message)
        self._lease = 0
