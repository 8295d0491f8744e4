"""The node's record of each staged volume, on disk under the state directory.

    <state_dir>/volumes/<volume>.json   what NodeStage attached and where it staged it
    <state_dir>/attach/<volume>/        the attacher's files (the FUSE export, a pid file)
    <state_dir>/published/<digest>      the read-only loop device of a read-only block
                                        publish, by its target path's digest

A record is written (atomically: temporary file, fsync, rename) as soon as the device is
attached and before it is used, and removed only after NodeUnstage detached it: a driver
that restarts in between still knows what to undo.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from volkin.csi.attach import Attachment


@dataclass(frozen=True)
class Staged:
    volume: str
    staging_path: str
    access: str  # "mount" or "block"
    attachment: Attachment


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _record(self, volume: str) -> Path:
        return self.root / "volumes" / f"{volume}.json"

    def workdir(self, volume: str) -> Path:
        return self.root / "attach" / volume

    def load(self, volume: str) -> Staged | None:
        try:
            raw = json.loads(self._record(volume).read_text())
        except FileNotFoundError:
            return None
        return Staged(raw["volume"], raw["staging_path"], raw["access"],
                      Attachment.from_json(raw["attachment"]))

    def save(self, staged: Staged) -> None:
        path = self._record(staged.volume)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(
            {"volume": staged.volume, "staging_path": staged.staging_path,
             "access": staged.access, "attachment": staged.attachment.to_json()},
            sort_keys=True))

    def _published(self, target: str) -> Path:
        return self.root / "published" / hashlib.sha256(target.encode()).hexdigest()

    def save_readonly_device(self, target: str, device: str) -> None:
        path = self._published(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, device)

    def readonly_device(self, target: str) -> str:
        try:
            return self._published(target).read_text()
        except FileNotFoundError:
            return ""

    def forget_readonly_device(self, target: str) -> None:
        self._published(target).unlink(missing_ok=True)

    def remove(self, volume: str) -> None:
        self._record(volume).unlink(missing_ok=True)
        workdir = self.workdir(volume)
        if workdir.is_dir():
            for leftover in workdir.iterdir():
                leftover.unlink(missing_ok=True)
            workdir.rmdir()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
