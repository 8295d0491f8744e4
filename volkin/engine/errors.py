"""Errors of the map engine: values that say what the caller asked and what to do instead.

Each is also one of the shared domain errors of `volkin.errors` (a module that
imports nothing), so the one table in `volkin.rpc_status` gives it its gRPC
status; the engine itself imports nothing of gRPC.
"""

from __future__ import annotations

from volkin.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, VolkinError


class EngineError(VolkinError):
    """Base of every error the engine raises for a caller's request."""


class VolumeNotFound(EngineError, NotFound):
    def __init__(self, name: str) -> None:
        super().__init__(f"volume {name!r} does not exist")
        self.name = name


class VolumeExists(EngineError, AlreadyExists):
    def __init__(self, name: str) -> None:
        super().__init__(f"volume {name!r} already exists; pick another name or delete it first")
        self.name = name


class InvalidRequest(EngineError, InvalidArgument):
    """The request can never succeed as asked (bad size, block out of range, ...)."""


class Conflict(EngineError, FailedPrecondition):
    """The request is valid but the current state forbids it (dependents, sizes differ, ...)."""


class MapInvariantBroken(Exception):
    """The engine found its own maps inconsistent: a bug, never a user mistake."""
