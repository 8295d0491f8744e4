"""Background copies give way to clients, without polling.

While a client did I/O in the last `window` seconds, at most `busy_slots` background
block copies (of every job together) run at once, and they start at least `busy_gap`
seconds apart (a trickle, so that a refresh under a steady load still moves on): a
job's copies and map commits
share the agents, etcd and the controller's one event loop with the clients'
requests and must not crowd them out. The other copies wait in line and are let
in one at a time as running ones finish, or all at once when clients have been
quiet for `window` seconds. One task watches the line; nothing wakes up
periodically per waiting copy (a job has hundreds of workers: each polling every
few milliseconds cost more event-loop time than the copies).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable


class Yield:
    def __init__(self, last_foreground: Callable[[], float], window: float,
                 busy_slots: int, busy_gap: float = 0.0) -> None:
        self._last_foreground = last_foreground  # time.monotonic() of the last client I/O
        self._window = window
        self._slots = busy_slots
        self._gap = busy_gap
        self._last_start = -busy_gap  # when the last copy started while clients were busy
        self.running = 0  # background copies admitted and not yet done
        self._line: collections.deque[asyncio.Future[None]] = collections.deque()
        self._changed = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    def _busy_for(self) -> float:
        """Seconds until clients count as quiet (0: they are)."""
        return max(0.0, self._last_foreground() + self._window - time.monotonic())

    async def enter(self) -> None:
        """Returns when a background copy may start; `leave()` when it is done."""
        if not self._line and (not self._busy_for() or self._may_start_now()):
            self.running += 1
            return
        admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._line.append(admitted)
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            await admitted
        except asyncio.CancelledError:
            if admitted.done() and not admitted.cancelled():
                self.leave()  # let in, but cancelled before it could start
            raise

    def charge(self, copies: int) -> None:
        """Counts `copies` more block copies against the gap while clients are busy: a
        background run admitted once that moved several blocks' worth of data."""
        if copies > 0 and self._gap and self._busy_for():
            self._last_start = max(self._last_start, time.monotonic()) + copies * self._gap

    def leave(self) -> None:
        self.running -= 1
        self._changed.set()

    async def _watch(self) -> None:
        try:
            while self._line:
                wait = self._busy_for()
                if not wait:  # clients are quiet: everyone in line goes
                    while self._line:
                        self._admit(self._line.popleft())
                    break
                if self._may_start_now():
                    self._admit(self._line.popleft())
                    continue
                if self.running < self._slots:  # a slot is free, the gap is not over
                    wait = min(wait, self._last_start + self._gap - time.monotonic())
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()
        finally:
            self._watcher = None

    def _may_start_now(self) -> bool:
        """While clients are busy: a slot is free and the gap since the last start is over
        (which then starts now)."""
        now = time.monotonic()
        if self.running >= self._slots or now - self._last_start < self._gap:
            return False
        self._last_start = now
        return True

    def _admit(self, admitted: asyncio.Future[None]) -> None:
        if not admitted.done():  # a cancelled waiter is skipped
            self.running += 1
            admitted.set_result(None)
