"""The dev cluster's memory between commands: DIR/cluster.json.

It records, per component, the addresses it serves (kept across restarts, so that
`VOLKIN_CONTROLLER` stays valid and agents come back where peers and the controller
expect them), and the pid and exact command line of the process started last, so
that a later command can tell "still running" from "a stranger reusing the pid".
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from volkin.errors import InvalidArgument

STATE_FILE = "cluster.json"
VERSION = 1


@dataclass
class Component:
    """One process of the cluster. `kind` is etcd, agent or controller."""

    name: str
    kind: str
    # The address clients dial; "" until the first start picked a port.
    address: str = ""
    # Kind-specific second addresses: etcd "peer", agent "metrics", controller "nbd".
    extra: dict[str, str] = field(default_factory=dict)
    pid: int = 0
    argv: list[str] = field(default_factory=list)


@dataclass
class ClusterState:
    components: list[Component]
    # Every channel over mTLS with the certificates in DIR/tls (`dev up --tls`).
    tls: bool = False

    def by_kind(self, kind: str) -> list[Component]:
        return [c for c in self.components if c.kind == kind]

    def get(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)


def state_path(directory: Path) -> Path:
    return directory / STATE_FILE


def load(directory: Path) -> ClusterState | None:
    """The recorded state, or None when DIR holds no cluster yet."""
    path = state_path(directory)
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        # A directory that cannot be used: exit code 2, like one that cannot be made.
        raise InvalidArgument(f"cannot read {path}: {exc}; remove it to start afresh") from exc
    if raw.get("version") != VERSION:
        raise InvalidArgument(f"{path} is of another version ({raw.get('version')!r}); "
                                 "run volkin dev down and remove the directory")
    return ClusterState([Component(**c) for c in raw["components"]], bool(raw.get("tls")))


def save(directory: Path, state: ClusterState) -> None:
    """Writes the state atomically (a crash leaves the old file or the new one)."""
    path = state_path(directory)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": VERSION, "tls": state.tls,
                               "components": [asdict(c) for c in state.components]}, indent=2))
    os.replace(tmp, path)
