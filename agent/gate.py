"""A shared/exclusive gate that orders mutations of one extent against epoch changes.

Mutations hold the gate shared for the whole of their check-then-write, so any
number of them run at once. Raising the extent's epoch (or deleting it) holds the
gate exclusive: it waits for in-flight mutations to finish, and no mutation that
was checked against the old epoch can land after the new one is recorded. Waiting
exclusive holders block new shared ones, so a newer owner is never starved.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class Gate:
    def __init__(self) -> None:
        self._cond = threading.Condition()
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
