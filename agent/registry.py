"""The agent's registration in etcd: one key under a lease the agent keeps alive.

    {prefix}/agents/{node_id} = {"node_id", "address", "metrics_address", "pid", ...}

The controller lists the prefix to discover agents and sees an agent die when its
lease expires `lease_ttl` seconds after the last renewal. The agent serves block
I/O whether or not etcd is reachable; registration only retries in the background.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict, dataclass

from volkin.etcd import Etcd, EtcdUnavailable, LeaseLost
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

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


def agent_key(prefix: str, node_id: str) -> str:
    return f"{prefix.rstrip('/')}/agents/{node_id}"


class Registration:
    """Keeps `record` at `key` under a lease; re-registers whenever the lease is lost."""

    def __init__(self, etcd: Etcd, key: str, record: AgentRecord, ttl: int) -> None:
        self._etcd = etcd
        self._key = key
        self._value = record.encode()
        self._ttl = ttl
        self._lease = 0
        self.registered = asyncio.Event()

    async def run(self) -> None:
        """Registers, then renews every ttl/3 seconds, until cancelled."""
        interval = max(self._ttl / 3, 0.2)
        outage = False
        while True:
            try:
                if not self._lease:
                    lease = await self._etcd.grant_lease(self._ttl)
                    await self._etcd.put(self._key, self._value, lease)
                    self._lease = lease
                    self.registered.set()
                    event(_log, "agent.registered", key=self._key, lease=f"{lease:x}",
                          ttl=self._ttl)
                else:
                    await self._etcd.keep_alive(self._lease)
                    # Someone may have deleted the key while the lease lived on.
                    if await self._etcd.get(self._key) != self._value:
                        await self._etcd.put(self._key, self._value, self._lease)
                        event(_log, "agent.reregistered", key=self._key, reason="key changed")
                if outage:
                    outage = False
                    event(_log, "agent.etcd_reachable", key=self._key)
            except LeaseLost:
                event(_log, "agent.lease_lost", logging.WARNING, key=self._key,
                      lease=f"{self._lease:x}")
                self._lease = 0
                self.registered.clear()
                continue
            except EtcdUnavailable as exc:
                if not outage:
                    outage = True
                    event(_log, "agent.etcd_unreachable", logging.WARNING, key=self._key,
                          error=exc.message)
            await asyncio.sleep(interval)

    async def withdraw(self) -> None:
        """Revokes the lease so the controller sees the agent go at once (best effort)."""
        if not self._lease:
            return
        try:
            await self._etcd.revoke_lease(self._lease)
            event(_log, "agent.deregistered", key=self._key)
        except EtcdUnavailable as exc:
            event(_log, "agent.deregister_failed", logging.WARNING, key=self._key,
                  error=exc.message)
        self._lease = 0
