"""Every etcd key volkin reads or writes, named in one place.

`Keys(prefix)` answers each key under a cluster's prefix (default `/volkin`);
nothing else in volkin builds a key string. docs/architecture.md lists them with
what each holds.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "/volkin"


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

    # -- volumes, maps, placement and jobs -------------------------------------------
    @property
    def topology(self) -> str:
        return f"{self.prefix}/topology"

    @property
    def maps(self) -> str:
        """Prefix of the map segments."""
        return f"{self.prefix}/maps/"

    def map_segment(self, map_id: str, segment: int) -> str:
        return f"{self.maps}{map_id}/{segment:08d}"

    @property
    def placement(self) -> str:
        return f"{self.prefix}/placement"

    @property
    def jobs(self) -> str:
        """Prefix of the job records."""
        return f"{self.prefix}/jobs/"

    def job(self, job_id: str) -> str:
        return f"{self.jobs}{job_id}"

    @property
    def jobs_next(self) -> str:
        return f"{self.prefix}/jobs-next"
