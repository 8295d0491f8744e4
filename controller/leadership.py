"""Which controller is active, and its fencing epoch.

The active controller holds `<prefix>/controller/leader` under a lease it keeps
alive; the value names it (node id and lease id), and every transaction of its
map store requires that value (`MapStore` guard), so a controller whose lease
expired can no longer change a map. On taking over it increments
`<prefix>/controller/epoch`: that number is the fencing epoch it sends with
every mutation to the agents, which refuse anything older than the newest epoch
they have seen. A second controller waits until the leader key is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from volkin.etcd import Etcd, EtcdUnavailable, LeaseLost, increment
from volkin.log import event

_log = logging.getLogger("controller.leadership")


class Leadership:
    def __init__(self, etcd: Etcd, prefix: str, node_id: str, ttl: int) -> None:
        self._etcd = etcd
        self._prefix = prefix.rstrip("/")
        self._node_id = node_id
        self._ttl = ttl
        self.lease = 0
        self.value = b""
        self.epoch = 0
        self.lost = asyncio.Event()

    @property
    def key(self) -> str:
        return f"{self._prefix}/controller/leader"

    async def acquire(self) -> None:
        """Returns once this controller is the active one, with a new epoch."""
        waiting = False
        while True:
            self.lease = await self._etcd.grant_lease(self._ttl)
            self.value = json.dumps({"node_id": self._node_id, "lease": self.lease}).encode()
            if await self._etcd.txn(if_absent=[self.key], put={self.key: self.value},
                                    lease_id=self.lease):
                break
            await self._etcd.revoke_lease(self.lease)
            if not waiting:
                holder = await self._etcd.get(self.key)
                event(_log, "controller.standby", node=self._node_id,
                      leader=(holder or b"?").decode())
                waiting = True
            await asyncio.sleep(max(self._ttl / 3, 0.2))
        self.epoch = await increment(self._etcd, f"{self._prefix}/controller/epoch",
                                     guard={self.key: self.value})
        event(_log, "controller.leader", node=self._node_id, epoch=self.epoch)

    async def keep(self) -> None:
        """Renews the lease every ttl/3 seconds; sets `lost` once it cannot be trusted."""
        interval = max(self._ttl / 3, 0.2)
        silent_since: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._etcd.keep_alive(self.lease)
                silent_since = None
            except LeaseLost:
                break
            except EtcdUnavailable:
                silent_since = silent_since or loop.time()
                if loop.time() - silent_since >= self._ttl:
                    break  # the lease may well have expired: another controller may lead
            await asyncio.sleep(interval)
        event(_log, "controller.lost_leadership", logging.ERROR, node=self._node_id)
        self.lost.set()

    async def release(self) -> None:
        with contextlib.suppress(EtcdUnavailable):  # the lease then expires by itself
            await self._etcd.revoke_lease(self.lease)
