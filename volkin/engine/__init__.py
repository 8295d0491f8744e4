"""The map engine: pure, in-memory, no I/O.

Given the volume graph and its maps, it decides which copies and map changes
an operation needs and in which order, and answers with a `Plan`. Transport,
etcd and block stores call it; it calls none of them. Only the standard
library is imported here.
"""

from volkin.engine.bitmap import SegmentedBitmap
from volkin.engine.engine import Deleted, MapEngine, RefreshStarted, VolumeInfo
from volkin.engine.errors import (
    Conflict,
    EngineError,
    InvalidRequest,
    MapInvariantBroken,
    VolumeExists,
    VolumeNotFound,
)
from volkin.engine.graph import Kind, Link
from volkin.engine.plan import BitChange, Commit, Copy, CopyRun, Loc, Plan, Read, Step, Write
from volkin.engine.records import Changes

__all__ = [
    "BitChange",
    "Changes",
    "Commit",
    "Conflict",
    "Copy",
    "CopyRun",
    "Deleted",
    "EngineError",
    "InvalidRequest",
    "Kind",
    "Link",
    "Loc",
    "MapEngine",
    "MapInvariantBroken",
    "Plan",
    "Read",
    "RefreshStarted",
    "SegmentedBitmap",
    "Step",
    "VolumeExists",
    "VolumeInfo",
    "VolumeNotFound",
    "Write",
]
