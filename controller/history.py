"""etcd's history, compacted behind the active controller.

etcd keeps every earlier value of every key (its MVCC history) until someone
compacts it, and while it keeps them its database only grows: every topology
change and every map commit leaves its old value behind, so a cluster with a
handful of volumes that snapshots all day fills etcd's quota through history
alone, and etcd then refuses every write (the NOSPACE alarm). volkin reads only
current values and uses no watches: it needs no history, so the active
controller compacts it behind itself.

One round, every `every` seconds while this controller leads:

1. read etcd's current revision and database size (`Etcd.status`);
2. compact everything older than the revision the *previous* round read. One
   round of history is kept, so a read pinned at a revision (a paginated
   `Etcd.get_prefix`) has a whole round to finish, and a revision someone
   just read stays readable;
3. log `etcd.compacted` with the revision and the database size, and report
   an etcd alarm (NOSPACE) loudly whenever the set of active alarms changes.

Compaction frees pages inside etcd's database file and etcd reuses them, so the
file stops growing at what one or two rounds of writes need; only
defragmentation gives the pages back to the file system, and it blocks the
member — reads, writes and lease renewals — while it rewrites the file, longer
than a lease TTL on a large database. So the controller never defragments; that
is for the operator (docs/operations.md).

Compaction does not change any key, so it needs no guard; still only the leader
compacts, and a deposed term stops: `fence.deposed` ends `run`. Two controllers
compacting for a moment is harmless (compacting to a revision etcd has already
compacted past does nothing). Compaction is cluster-wide, whatever the prefix:
an etcd shared with programs that watch needs `compact_every = 0` and a
compaction policy of its own. Failures never reach the controller: an
unreachable etcd is tried again next round.
"""

from __future__ import annotations

import asyncio
import logging

from controller.fence import Fence
from volkin.errors import VolkinError
from volkin.etcd import Etcd, EtcdFull
from volkin.log import event

_log = logging.getLogger("controller.history")


class HistoryCompactor:
    def __init__(self, etcd: Etcd, fence: Fence, every: float = 60.0) -> None:
        self.etcd = etcd
        self.fence = fence
        self.every = every  # seconds between rounds; <= 0: never compact
        self.seen = 0  # the revision the previous round read: the next compaction point
        self.compacted = 0  # the revision this controller last compacted to
        self.alarms: list[str] = []  # etcd's active alarms, as of the last round
        self._failing = False

    async def run(self) -> None:
        """Compacts once every `every` seconds until this term is deposed (or the task
        is cancelled). The first round only notes the revision."""
        if self.every <= 0:
            return
        while not self.fence.deposed:
            await self.compact_once()
            await asyncio.sleep(self.every)

    async def compact_once(self) -> int:
        """One round: compacts up to the revision the previous round saw. Returns the
        revision compacted to (0: nothing this round). Never raises a VolkinError."""
        if not self.fence.valid():
            return 0  # deposed, or cannot prove the lease right now: not this round
        try:
            status = await self.etcd.status()
            await self._report_alarms()
            target, self.seen = self.seen, status.revision
            if not target or target <= self.compacted or self.fence.deposed:
                return 0
            await self.etcd.compact(target)
        except VolkinError as exc:
            if not self._failing:
                self._failing = True
                event(_log, "etcd.compact_failed", logging.WARNING, error=exc.message,
                      retry_in=f"{self.every:g}")
            return 0
        self._failing = False
        self.compacted = target
        event(_log, "etcd.compacted", revision=target, current=status.revision,
              db_size=status.db_size, db_size_in_use=status.db_size_in_use)
        return target

    async def _report_alarms(self) -> None:
        alarms = await self.etcd.alarms()
        if alarms == self.alarms:
            return
        self.alarms = alarms
        if alarms:
            event(_log, "etcd.alarm", logging.ERROR, alarms=",".join(alarms),
                  advice=EtcdFull.ADVICE if "NOSPACE" in alarms else "see etcd's log")
        else:
            event(_log, "etcd.alarm_cleared")
