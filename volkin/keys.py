"""Every etcd key volkin reads or writes, named in one place.

`Keys(prefix)` answers each key under a cluster's prefix (default `/volkin`);
nothing else in volkin builds a key string. docs/architecture.md lists them with
what each holds.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "/volkin"
# Kind of engine record -> the prefix of its keys (the record's name follows it).
_RECORD_DIRS = {"engine": "engine", "volume": "volumes/", "node": "nodes/",
                "map": "map-meta/", "synced": "synced/", "released": "released/"}


@dataclass(frozen=True)
class Keys:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", self.prefix.rstrip("/"))

    # -- the active controller -----------------------------------------------------
    @property
    def leader(self) -> str:
        """The active controller's claim, under its lease (JSON: node id, lease id)."""
        return f"{self.prefix}/controller/leader"

    @property
    def epoch(self) -> str:
        """The fencing epoch (decimal); each new leader adds one before it serves."""
        return f"{self.prefix}/controller/epoch"

    @property
    def controller_address(self) -> str:
        """Where the active controller serves (JSON: node id, admin, nbd, pid)."""
        return f"{self.prefix}/controller/address"

    # -- agents --------------------------------------------------------------------
    @property
    def agents(self) -> str:
        """Prefix of the agents' registrations."""
        return f"{self.prefix}/agents/"

    def agent(self, node_id: str) -> str:
        return f"{self.agents}{node_id}"

    # -- the engine's records (volkin/engine/records.py) ----------------------------------
    @property
    def layout(self) -> str:
        """Which layout of records this prefix holds (JSON: {"layout": 2})."""
        return f"{self.prefix}/layout"

    def record(self, kind: str, name: str) -> str:
        """The key of the engine record (kind, name), e.g. ("volume", "V1") -> volumes/V1."""
        return f"{self.prefix}/{_RECORD_DIRS[kind]}{name}"

    def record_prefix(self, kind: str) -> str:
        return f"{self.prefix}/{_RECORD_DIRS[kind]}"

    def record_of(self, key: str) -> tuple[str, str] | None:
        """The (kind, name) of an engine record's key, or None if it is not one."""
        rest = key[len(self.prefix) + 1:] if key.startswith(self.prefix + "/") else ""
        for kind, directory in _RECORD_DIRS.items():
            if directory.endswith("/") and rest.startswith(directory):
                return kind, rest[len(directory):]
            if rest == directory:
                return kind, ""
        return None

    @property
    def topology(self) -> str:
        """The previous layout's single record of the whole graph (migrated at start)."""
        return f"{self.prefix}/topology"

    @property
    def maps(self) -> str:
        """Prefix of the map segments."""
        return f"{self.prefix}/maps/"

    def map_segment(self, map_id: str, segment: int) -> str:
        return f"{self.maps}{map_id}/{segment:08d}"

    @property
    def placement(self) -> str:
        """The previous layout's single placement record (migrated at start)."""
        return f"{self.prefix}/placement"

    @property
    def extents(self) -> str:
        """Prefix of the placement records: memory -> (agent node id, extent id)."""
        return f"{self.prefix}/extents/"

    def extent(self, memory: str) -> str:
        return f"{self.extents}{memory}"

    @property
    def jobs(self) -> str:
        """Prefix of the job records."""
        return f"{self.prefix}/jobs/"

    def job(self, job_id: str) -> str:
        return f"{self.jobs}{job_id}"

    @property
    def jobs_next(self) -> str:
        return f"{self.prefix}/jobs-next"
