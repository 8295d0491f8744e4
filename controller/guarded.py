"""The controller's etcd writes, each guarded by its term's fence.

`GuardedEtcd` is the only way the controller writes to etcd once it leads: every
transaction compares the leader key with the term's value (`Fence.guard`), so a
deposed controller changes nothing, however late its transaction arrives. Reads
go to the plain client (`etcd`).

A transaction whose outcome is unknown (etcd did not answer) is sent again,
unchanged, until etcd answers: the puts and deletes are absolute values, so
applying them twice is the same as once, and the controller's view never
disagrees with etcd about a change etcd did apply. It gives up only when the term
ends (then the next term reloads everything from etcd) or after `give_up_after`
seconds; giving up with the outcome still unknown deposes the term too, for the
same reason: the controller's view of what it wrote can no longer be trusted.
A transaction etcd refused means the leader key no longer names this term: the
term is deposed at once.

A transaction etcd refused because its database is full (`EtcdFull`, the NOSPACE
alarm) is not repeated: nothing was written, and nothing will be until an
operator frees space. It raises at once, so the request that needed it fails
with a message saying what to do (RESOURCE_EXHAUSTED, NBD ENOSPC), and the term
goes on serving what needs no write. Only if an earlier attempt's outcome was
unknown does the term end, as when giving up: that attempt may have been applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from controller.fence import Deposed, Fence
from controller.metrics import EtcdMetrics
from volkin.errors import Unavailable
from volkin.etcd import Etcd, EtcdFull, EtcdUnavailable, LeaseLost
from volkin.log import event

_log = logging.getLogger("controller.etcd")
RETRY_PAUSE = (0.05, 0.1, 0.2, 0.4, 0.8)


class GuardedEtcd:
    def __init__(self, etcd: Etcd, fence: Fence, give_up_after: float = 60.0,
                 metrics: EtcdMetrics | None = None) -> None:
        self.etcd = etcd
        self.fence = fence
        self.give_up_after = give_up_after
        self.metrics = metrics or EtcdMetrics()
        self.transactions = 0  # sent (not counting repeats), for tests and metrics
        self.last_error = ""  # the most recent etcd failure, for job and status reports
        self.full = False  # etcd refused the last transaction for want of space

    async def txn(self, put: Mapping[str, bytes] | None = None, delete: Sequence[str] = (),
                  *, if_values: Mapping[str, bytes] | None = None,
                  if_absent: Sequence[str] = (), lease_id: int = 0) -> bool:
        """One transaction, guarded by the fence; returns False only when one of the
        extra conditions (`if_values`, `if_absent`) failed, not the guard."""
        if not put and not delete:
            return True
        self.transactions += 1
        started = time.monotonic()
        attempt = 0
        while True:
            if self.fence.deposed:
                self.fence.check()
            sent = time.perf_counter()
            try:
                done = await self.etcd.txn(
                    if_values={**self.fence.guard, **(if_values or {})}, if_absent=if_absent,
                    put=put, delete=delete, lease_id=lease_id)
            except EtcdFull as exc:
                self.metrics.seconds.observe(time.perf_counter() - sent)
                self._refused_for_space(exc, attempt)
                raise
            except (EtcdUnavailable, LeaseLost) as exc:
                self.metrics.retries.inc()
                self.last_error = exc.message
                if attempt == 0:
                    event(_log, "etcd.retrying", logging.WARNING, keys=len(put or {}) + len(
                        delete), error=exc.message)
                if time.monotonic() - started >= self.give_up_after:
                    reason = (f"etcd did not confirm a transaction for {self.give_up_after:.0f} s "
                              f"({exc.message}); stepping down so the maps are reloaded")
                    self.fence.depose(reason)
                    raise Unavailable(reason) from exc
                await asyncio.sleep(RETRY_PAUSE[min(attempt, len(RETRY_PAUSE) - 1)])
                attempt += 1
                continue
            self.metrics.seconds.observe(time.perf_counter() - sent)
            if attempt:
                event(_log, "etcd.recovered", attempts=attempt + 1,
                      waited=f"{time.monotonic() - started:.2f}")
            self.last_error = ""
            if self.full:
                self.full = False
                event(_log, "etcd.space_available", keys=len(put or {}) + len(delete))
            if done:
                return True
            await self._check_guard()
            return False

    def _refused_for_space(self, exc: EtcdFull, attempt: int) -> None:
        self.last_error = exc.message
        if not self.full:  # once per episode: until a transaction gets through again
            self.full = True
            event(_log, "etcd.nospace", logging.ERROR, error=exc.message)
        if attempt:
            self.fence.depose(f"etcd's database is full and an earlier attempt of a "
                              f"transaction may have been applied; stepping down so the maps "
                              f"are reloaded ({exc.message})")

    async def put(self, key: str, value: bytes, lease_id: int = 0) -> None:
        await self.txn({key: value}, lease_id=lease_id)

    async def delete(self, *keys: str) -> None:
        await self.txn(delete=list(keys))

    async def increment(self, key: str) -> int:
        """Adds one to the counter at `key` (absent: 0) and returns the new value. A
        repeat after an unknown outcome may skip a number, never reuse one."""
        while True:
            raw = await self.etcd.get(key)
            value = int(raw) + 1 if raw else 1
            if await self.txn({key: str(value).encode()}, if_values={key: raw} if raw else None,
                              if_absent=[] if raw else [key]):
                return value
            await asyncio.sleep(0.01)

    async def _check_guard(self) -> None:
        """After a refused transaction: if the leader key no longer names this term, the
        term is over."""
        for key, value in self.fence.guard.items():
            try:
                held = await self.etcd.get(key)
            except EtcdUnavailable:
                continue
            if held != value:
                self.fence.depose(f"{key} no longer names this controller (another one took "
                                  f"over)")
                raise Deposed(f"this controller is no longer the active one: "
                              f"{self.fence.reason}")
