"""The fence: one leadership term's proof that this controller may still act.

Every etcd write of the controller and every agent call carries the term's
`Fence`, so an unguarded write cannot be written by accident:

- `guard` is the compare every etcd transaction makes (the leader key holds
  exactly this term's value), so etcd refuses a deposed controller's write
  however late it arrives;
- `epoch` goes with every agent mutation; agents refuse anything older than the
  newest epoch they have seen, node-wide;
- the *deadline* is how long this controller can prove, on its own monotonic
  clock, that its lease is alive: the send time of the last renewal that etcd
  confirmed, plus the lease TTL, minus a margin. etcd cannot expire the lease
  before that instant, so no other controller can lead before it either.
  Nothing is sent to an agent and nothing is acknowledged past the deadline; a
  renewal that succeeds later extends it again (an etcd blip), a renewal that
  finds the lease gone deposes the term for good.

Deposition is one way: a deposed fence never becomes valid again. A new term
gets a new fence, so a task left over from an old term can never act with the
new one's rights.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

from volkin.errors import FencedOut, Unavailable


class Deposed(FencedOut):
    """This controller is no longer the active one (its lease is gone, or an agent or
    etcd saw a newer one); whatever it was doing must stop without acknowledging."""


class Fence:
    def __init__(self, epoch: int, guard: Mapping[str, bytes], node_id: str = "") -> None:
        self.epoch = epoch
        self.guard: Mapping[str, bytes] = dict(guard)
        self.node_id = node_id
        self._deadline = 0.0  # time.monotonic() until which the lease is provably alive
        self._reason = ""
        self._changed = asyncio.Event()  # pulsed whenever the deadline moves or on deposition

    @staticmethod
    def without_lease(epoch: int = 1, guard: Mapping[str, bytes] | None = None) -> Fence:
        """A fence with no lease behind it, valid until deposed (the guard, if any, still
        applies): for tests and single-process tools."""
        fence = Fence(epoch, guard or {})
        fence._deadline = float("inf")
        return fence

    # -- state ---------------------------------------------------------------------
    @property
    def deposed(self) -> bool:
        return bool(self._reason)

    @property
    def reason(self) -> str:
        return self._reason

    def remaining(self) -> float:
        """Seconds this term can still prove its lease (<= 0: it cannot right now)."""
        if self._reason:
            return 0.0
        return self._deadline - time.monotonic()

    def valid(self) -> bool:
        return self.remaining() > 0

    # -- changes (from the lease keeper, or from whoever learns of a newer leader) ----
    def extend(self, until: float) -> None:
        """The lease is provably alive until `until` (monotonic)."""
        if not self._reason and until > self._deadline:
            self._deadline = until
            self._pulse()

    def depose(self, reason: str) -> None:
        if not self._reason:
            self._reason = reason
            self._deadline = 0.0
            self._pulse()

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- checks --------------------------------------------------------------------
    def check(self) -> None:
        """Raises unless this term may act right now (no waiting)."""
        if self._reason:
            raise Deposed(f"this controller is no longer the active one: {self._reason}")
        if self.remaining() <= 0:
            raise Unavailable("this controller cannot reach etcd to prove it still leads; "
                              "retry shortly")

    async def ready(self, timeout: float) -> None:
        """Waits up to `timeout` seconds until this term may act; raises `Deposed` at once
        if it never will, `Unavailable` if the time runs out."""
        end = time.monotonic() + timeout
        while True:
            if self._reason or self.remaining() > 0:
                self.check()
                return
            left = end - time.monotonic()
            if left <= 0:
                self.check()
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
