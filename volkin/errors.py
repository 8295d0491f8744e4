"""Domain errors shared by the agent, the controller and the CLI.

Each error is a value with a cause: the message says what the caller did and,
where there is one, what to do instead. Transport layers never invent their own
errors; they translate these in exactly one place (`volkin.rpc_status`).
"""

from __future__ import annotations


class VolkinError(Exception):
    """Base of every error that volkin reports to a caller on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(VolkinError):
    """The request is malformed: misaligned, empty, too large, a bad name. Nothing was done."""


class OutOfRange(VolkinError):
    """The request reaches past the end of an extent or volume. Nothing was done."""


class NotFound(VolkinError):
    """The named extent, volume or job does not exist."""


class AlreadyExists(VolkinError):
    """Something with that name exists already with different properties."""


class FailedPrecondition(VolkinError):
    """The request is valid, but the current state forbids it (dependents, sizes differ).
    Nothing was done; the message says what has to change first."""


class FencedOut(FailedPrecondition):
    """The caller's fencing epoch is lower than one already seen: a newer owner took over."""


class Aborted(VolkinError):
    """The call collided with another in flight on the same thing, or continues a listing
    that can no longer be continued: start again (the CSI driver's concurrency and list
    tokens)."""


class StorageFull(VolkinError):
    """The storage under the agent ran out of space (ENOSPC/EDQUOT)."""


class StorageIOError(VolkinError):
    """The storage under the agent failed an I/O (EIO and other OS errors)."""


class Unavailable(VolkinError):
    """A dependency (a peer agent, etcd) could not be reached; retrying later may succeed."""
