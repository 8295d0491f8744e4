"""Errors of the map engine: values that say what the caller asked and what to do instead.

Each carries a `code` naming its class of fault in words the gRPC layer maps
once to a status code (not_found -> NOT_FOUND, and so on); the engine itself
imports nothing of gRPC.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises for a caller's request."""

    code = "internal"


class VolumeNotFound(EngineError):
    code = "not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"volume {name!r} does not exist")
        self.name = name


class VolumeExists(EngineError):
    code = "already_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"volume {name!r} already exists; pick another name or delete it first")
        self.name = name


class InvalidRequest(EngineError):
    """The request can never succeed as asked (bad size, block out of range, ...)."""

    code = "invalid_argument"


class Conflict(EngineError):
    """The request is valid but the current state forbids it (dependents, sizes differ, ...)."""

    code = "failed_precondition"


class MapInvariantBroken(Exception):
    """The engine found its own maps inconsistent: a bug, never a user mistake."""
