"""A shared/exclusive gate: many holders at once, or one alone.

The agent uses two kinds (see docs/agent.md):

- the **node gate** (`agent.fencing`): every mutation holds it shared from its epoch
  check to the end of its I/O; recording a newer epoch holds it exclusive, so it waits
  for in-flight mutations and no mutation checked against the old epoch can land after
  the new one is recorded;
- an **extent's gate** (`agent.blockstore`): reads and mutations of the extent hold it
  shared while they use its file descriptor; deleting the extent holds it exclusive,
  so the descriptor is never closed under a call that still uses it.

Waiting exclusive holders block new shared ones, so an exclusive holder (a newer
owner, a delete) is never starved. The gate is not re-entrant: a thread that holds it
shared must not ask for it again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class Gate:
    def __init__(self) -> None:
        # A plain Lock: cheaper than the default RLock on the write path.
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting_exclusive = 0

    def try_acquire_shared(self) -> bool:
        """Takes the gate shared if that needs no waiting; False otherwise."""
        with self._cond:
            if self._exclusive or self._waiting_exclusive:
                return False
            self._shared += 1
            return True

    def release_shared(self) -> None:
        with self._cond:
            self._shared -= 1
            if self._shared == 0:
                self._cond.notify_all()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting_exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            self.release_shared()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting_exclusive += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting_exclusive -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()
