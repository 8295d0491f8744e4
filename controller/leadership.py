"""Which controller is active, and the fence of its term.

The active controller holds `Keys.leader` under a lease it keeps alive; the
value names it (node id and lease id). On taking over it adds one to
`Keys.epoch` (guarded by its leader key): that number is the fencing epoch it
sends with every agent mutation. A second controller waits as a standby until
the leader key is gone.

Each term has a `Fence` (see `controller.fence`). `keep()` renews the lease every
ttl/3 seconds and moves the fence's deadline to the send time of each confirmed
renewal plus the TTL minus a margin: etcd measures the TTL from when it *received*
the renewal, which is later, so the lease cannot expire before the deadline,
and nothing is sent or acknowledged after it. The term ends (the fence is
deposed) when etcd says the lease is gone, or when no renewal has been confirmed
for a whole TTL (it may well have expired: another controller may lead).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from controller.fence import Fence
from volkin.errors import FencedOut
from volkin.etcd import Etcd, EtcdUnavailable, LeaseLost
from volkin.keys import Keys
from volkin.log import event

_log = logging.getLogger("controller.leadership")


def lease_margin(ttl: float) -> float:
    """How much earlier than etcd could expire a lease we stop trusting it: room for a
    clock that runs a little slower than etcd's and for scheduling delays."""
    return max(0.5, ttl / 5)


class Leadership:
    def __init__(self, etcd: Etcd, keys: Keys, node_id: str, ttl: int) -> None:
        self._etcd = etcd
        self._keys = keys
        self._node_id = node_id
        self._ttl = ttl
        self.lease = 0
        self.value = b""
        self._granted: set[int] = set()  # leases this process granted itself
        self.fence = Fence(0, {})
        self.fence.depose("not yet elected")

    @property
    def key(self) -> str:
        return self._keys.leader

    @property
    def epoch(self) -> int:
        return self.fence.epoch

    async def acquire(self) -> Fence:
        """Returns once this controller is the active one, with a new epoch and fence.
        etcd being unreachable only makes it wait longer."""
        waiting = False
        while True:
            try:
                fence = await self._try_acquire()
            except EtcdUnavailable as exc:
                event(_log, "controller.etcd_unreachable", logging.WARNING,
                      node=self._node_id, error=exc.message)
                fence = None
            if fence is not None:
                self.fence = fence
                event(_log, "controller.leader", node=self._node_id, epoch=fence.epoch)
                return fence
            if not waiting:
                with contextlib.suppress(EtcdUnavailable):
                    holder = await self._etcd.get(self.key)
                    event(_log, "controller.standby", node=self._node_id,
                          leader=(holder or b"?").decode())
                    waiting = True
            await asyncio.sleep(max(self._ttl / 3, 0.2))

    async def _try_acquire(self) -> Fence | None:
        await self._revoke_own_stale_claim()
        sent = time.monotonic()
        lease = await self._etcd.grant_lease(self._ttl)
        self._granted.add(lease)
        value = json.dumps({"node_id": self._node_id, "lease": lease}).encode()
        if not await self._etcd.txn(if_absent=[self.key], put={self.key: value},
                                    lease_id=lease):
            with contextlib.suppress(EtcdUnavailable):
                await self._etcd.revoke_lease(lease)
            return None
        self.lease, self.value = lease, value
        guard = {self.key: value}
        try:
            epoch = await _next_epoch(self._etcd, self._keys.epoch, guard)
        except (EtcdUnavailable, FencedOut):
            with contextlib.suppress(EtcdUnavailable):
                await self._etcd.revoke_lease(lease)
            raise EtcdUnavailable("the fencing epoch could not be raised") from None
        fence = Fence(epoch, guard, self._node_id)
        fence.extend(sent + self._ttl - lease_margin(self._ttl))
        return fence

    async def _revoke_own_stale_claim(self) -> None:
        """A leader key held under a lease this process granted, in an earlier term, is a
        stale claim of ours (the revoke on stepping down did not reach etcd, and an etcd
        restart renews every lease): revoke it rather than wait out its TTL."""
        holder = await self._etcd.get(self.key)
        if holder is None:
            return
        try:
            lease = int(json.loads(holder)["lease"])
        except (ValueError, KeyError, TypeError):
            return
        if lease in self._granted:  # acquire runs only once our last term is over
            event(_log, "controller.revoking_stale_claim", node=self._node_id,
                  lease=f"{lease:x}")
            await self._etcd.revoke_lease(lease)

    async def keep(self, fence: Fence) -> None:
        """Renews the lease until the term ends; then deposes `fence` and returns."""
        interval = max(self._ttl / 3, 0.2)
        confirmed = time.monotonic()
        reason = ""
        while not fence.deposed:
            sent = time.monotonic()
            try:
                await self._etcd.keep_alive(self.lease)
            except LeaseLost:
                reason = "its etcd lease expired"
            except EtcdUnavailable as exc:
                if time.monotonic() - confirmed >= self._ttl:
                    reason = f"no lease renewal was confirmed for {self._ttl} s ({exc.message})"
            else:
                confirmed = sent
                fence.extend(sent + self._ttl - lease_margin(self._ttl))
            if reason:
                fence.depose(reason)
                break
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - sent)))
        event(_log, "controller.lost_leadership", logging.ERROR, node=self._node_id,
              epoch=fence.epoch, reason=fence.reason)

    async def release(self) -> None:
        """Gives the leadership up at once (the next controller need not wait out the lease)."""
        self.fence.depose("this controller stepped down")
        if not self.lease:
            return
        lease, self.lease = self.lease, 0
        with contextlib.suppress(EtcdUnavailable):  # the lease then expires by itself
            await self._etcd.revoke_lease(lease)


async def _next_epoch(etcd: Etcd, key: str, guard: dict[str, bytes]) -> int:
    """Adds one to the epoch counter while `guard` holds; FencedOut if it stops holding."""
    while True:
        raw = await etcd.get(key)
        value = int(raw) + 1 if raw else 1
        if await etcd.txn(if_values={**guard, **({key: raw} if raw else {})},
                          if_absent=[] if raw else [key], put={key: str(value).encode()}):
            return value
        held = await etcd.get(next(iter(guard)))
        if held != guard[next(iter(guard))]:
            raise FencedOut("the leader key changed while the epoch was being raised")
        await asyncio.sleep(0.05)
