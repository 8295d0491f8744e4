"""The extents directory on disk: one data file and one meta file per extent.

    DATA_DIR/extents/<extent_id>.extent   the data: a sparse file of exactly size_bytes
    DATA_DIR/extents/<extent_id>.meta     JSON: format, extent id, size, block size,
                                          epoch, state ("live" or "deleted")

The meta is the truth: an extent exists when its meta says "live". Deleting writes a
"deleted" meta (a tombstone) before the data file goes, so a crash in between leaves
an extent that is gone, not half there. A data file without a live meta is debris of
a crash during create or delete and `scan` removes it.

The meta's `epoch` is the epoch of the call that wrote it (create or delete). It is
information only: fencing is node-wide (`agent.fencing`), and the highest of these
epochs is only read once, to initialise the node epoch of a data directory that
predates it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from agent import fileio

META_FORMAT = 1
State = Literal["live", "deleted"]


@dataclass(frozen=True)
class ExtentMeta:
    extent_id: str
    size_bytes: int
    block_size: int
    epoch: int
    state: State


@dataclass(frozen=True)
class Scan:
    """What the directory held when the agent started."""

    live: list[ExtentMeta]
    tombstones: list[ExtentMeta]

    def highest_epoch(self) -> int:
        """The highest epoch any meta recorded (0 if none)."""
        return max((m.epoch for m in self.live + self.tombstones), default=0)


class ExtentDir:
    """Paths and meta files of the extents directory. Knows nothing of open files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def data_path(self, extent_id: str) -> Path:
        return self.path / f"{extent_id}.extent"

    def meta_path(self, extent_id: str) -> Path:
        return self.path / f"{extent_id}.meta"

    def write_meta(self, meta: ExtentMeta) -> None:
        """Replaces the extent's meta atomically and durably (see `write_file_durably`)."""
        record = {"format": META_FORMAT, **asdict(meta)}
        with fileio.storage_errors(f"recording metadata of extent {meta.extent_id}"):
            fileio.write_file_durably(self.meta_path(meta.extent_id),
                                      json.dumps(record, sort_keys=True).encode())

    def scan(self) -> Scan:
        """Reads every meta, then removes debris: data files without a live meta and
        temporary files of an interrupted meta write."""
        live: list[ExtentMeta] = []
        tombstones: list[ExtentMeta] = []
        for meta_path in sorted(self.path.glob("*.meta")):
            extent_id = meta_path.name[: -len(".meta")]
            with fileio.storage_errors(f"loading extent {extent_id}"):
                record = json.loads(meta_path.read_bytes())
            meta = ExtentMeta(extent_id, int(record["size_bytes"]), int(record["block_size"]),
                              int(record["epoch"]),
                              "deleted" if record.get("state") == "deleted" else "live")
            (tombstones if meta.state == "deleted" else live).append(meta)
        names = {m.extent_id for m in live}
        for data_path in self.path.glob("*.extent"):
            if data_path.name[: -len(".extent")] not in names:
                data_path.unlink()  # debris of a crash during create or delete
        for tmp in self.path.glob("*.tmp"):
            tmp.unlink()
        return Scan(live, tombstones)
