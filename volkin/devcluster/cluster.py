"""`dev up`, `dev status` and `dev down` on a directory that holds one dev cluster.

`up` is idempotent: it starts exactly the components whose recorded process is not
running, on their recorded addresses, and waits until every component is healthy.
Order: etcd first (everything else needs it), then the missing agents and the
controller at once (the controller discovers agents through etcd, so their order
does not matter), then it waits until every agent is registered in etcd, so that a
volume can be created as soon as `up` returns.
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from volkin.devcluster import certs, components, processes, state
from volkin.devcluster.certs import ADMIN
from volkin.devcluster.components import ComponentFailed, Launch
from volkin.devcluster.state import ClusterState, Component
from volkin.errors import FailedPrecondition, InvalidArgument

DEFAULT_AGENTS = 3
_ETCD_PORT_ATTEMPTS = 3
Say = Callable[[str], None]


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    kind: str
    pid: int | None
    address: str
    extra: dict[str, str]
    running: bool
    log: str


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One `dev` command at a time per directory; also proves DIR is writable."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = open(directory / ".lock", "a")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InvalidArgument(f"cannot use {directory} for the dev cluster: "
                              f"{exc.strerror or exc}") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _initial(agents: int) -> ClusterState:
    return ClusterState([Component("etcd", "etcd")]
                        + [Component(f"agent{i}", "agent") for i in range(1, agents + 1)]
                        + [Component("controller", "controller")])


def _running(c: Component) -> bool:
    return processes.is_running(c.pid, c.argv)


def up(directory: Path, agents: int | None, timeout: float, say: Say,
       new_ports: bool = False, tls: bool = False) -> ClusterState:
    """Starts whatever is not running; returns the state once everything is healthy. With
    `new_ports`, what it starts gets new ports instead of its recorded ones (a program took
    one); the data stays. With `tls` every channel is mTLS from then on (a throwaway CA in
    DIR/tls); a cluster made with TLS keeps it."""
    directory = directory.resolve()
    with _locked(directory):
        cluster = state.load(directory) or _initial(agents or DEFAULT_AGENTS)
        if new_ports:
            _forget_ports(cluster)
        if tls and not cluster.tls:
            if any(_running(c) for c in cluster.components):
                raise InvalidArgument(f"the dev cluster in {directory} runs without TLS: "
                                      f"volkin dev down first, then dev up --tls")
            cluster.tls = True
        if cluster.tls:
            certs.ensure(directory)
        have = len(cluster.by_kind("agent"))
        if agents is not None and agents < have:
            raise InvalidArgument(f"the dev cluster in {directory} has {have} agents; it cannot "
                                  f"shrink to {agents} (dev down, remove the directory, dev up)")
        for i in range(have + 1, (agents or have) + 1):
            cluster.components.insert(-1, Component(f"agent{i}", "agent"))
        try:
            _start_etcd(directory, cluster, timeout, say)
            pending = []
            for c in cluster.components[1:]:
                if _running(c):
                    continue
                say(f"starting {c.name}")
                pending.append(components.launch(directory, cluster, c))
                state.save(directory, cluster)
            _wait_all(pending, timeout, say)
            _wait_registered(directory, cluster, timeout)
        except ComponentFailed as exc:
            if new_ports:
                raise
            raise ComponentFailed(f"{exc.message}; if another program took one of its "
                                  f"recorded ports, `volkin dev up --new-ports` picks new ones "
                                  f"and keeps the data") from exc
        finally:
            state.save(directory, cluster)
        return cluster


def runs_without_tls(directory: Path) -> bool:
    """Whether a cluster made without TLS runs in `directory` (`up(tls=True)` refuses it)."""
    cluster = state.load(directory.resolve())
    return (cluster is not None and not cluster.tls
            and any(_running(c) for c in cluster.components))


def _forget_ports(cluster: ClusterState) -> None:
    """The components that are not running will pick new ports when they start. etcd's
    address is in every other component's command line: it moves only with them."""
    etcd = cluster.by_kind("etcd")[0]
    stopped = [c for c in cluster.components if not _running(c)]
    if etcd in stopped and len(stopped) < len(cluster.components):
        raise InvalidArgument("etcd would move while other components still use its address: "
                              "run volkin dev down first, then dev up --new-ports")
    for c in stopped:
        c.address, c.extra = "", {}


def _start_etcd(directory: Path, cluster: ClusterState, timeout: float, say: Say) -> None:
    etcd = cluster.by_kind("etcd")[0]
    if _running(etcd):
        return
    fresh = not etcd.address
    for attempt in range(1, _ETCD_PORT_ATTEMPTS + 1):
        say(f"starting {etcd.name}")
        started = components.launch(directory, cluster, etcd)
        state.save(directory, cluster)
        try:
            components.wait_healthy(started, time.monotonic() + timeout)
            return
        except ComponentFailed:
            started.stop()
            # Ports picked a moment ago may have been taken since: pick others.
            if not fresh or attempt == _ETCD_PORT_ATTEMPTS:
                raise
            etcd.address, etcd.extra = "", {}


def _wait_all(pending: list[Launch], timeout: float, say: Say) -> None:
    deadline = time.monotonic() + timeout
    for started in pending:
        components.wait_healthy(started, deadline)
        c = started.component
        say(f"{c.name} is serving at {c.address} (pid {c.pid})")


def _wait_registered(directory: Path, cluster: ClusterState, timeout: float) -> None:
    etcd_address = cluster.by_kind("etcd")[0].address
    dev_certs = certs.of(directory, cluster.tls)
    admin_tls = dev_certs.tls(ADMIN) if dev_certs else None
    deadline = time.monotonic() + timeout
    while True:
        registered = components.registered_agents(etcd_address, admin_tls)
        missing = [a.name for a in cluster.by_kind("agent") if registered.get(a.name) != a.pid]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise ComponentFailed(f"agents {', '.join(missing)} serve but did not register in "
                                  f"etcd at {etcd_address} in time (see their logs)")
        time.sleep(0.1)


def status(directory: Path) -> list[ComponentStatus]:
    """Every recorded component with whether its process is running."""
    directory = directory.resolve()
    cluster = _existing(directory)
    out = []
    for c in cluster.components:
        running = _running(c)
        out.append(ComponentStatus(c.name, c.kind, c.pid if running else None, c.address,
                                   dict(c.extra), running,
                                   str(components.log_path(directory, c))))
    return out


def down(directory: Path, timeout: float, say: Say) -> None:
    """Stops every component, controller first and etcd last; keeps data and addresses."""
    directory = directory.resolve()
    with _locked(directory):
        cluster = _existing(directory)
        for c in reversed(cluster.components):
            if _running(c):
                say(f"stopping {c.name} (pid {c.pid})")
                if processes.stop(c.pid, c.argv, timeout):
                    say(f"{c.name} did not exit in {timeout:g}s: killed")
            c.pid = 0
        state.save(directory, cluster)


def addresses(cluster: ClusterState, directory: Path) -> dict[str, str]:
    """The environment a user needs: VOLKIN_CONTROLLER and VOLKIN_NBD; with TLS also
    VOLKIN_TLS_CA, _CERT and _KEY (the admin identity) and VOLKIN_NBD_TLS_DIR."""
    controller = cluster.by_kind("controller")[0]
    found = {"VOLKIN_CONTROLLER": controller.address, "VOLKIN_NBD": controller.extra["nbd"]}
    dev_certs = certs.of(directory.resolve(), cluster.tls)
    return {**found, **(dev_certs.environment() if dev_certs else {})}



def _existing(directory: Path) -> ClusterState:
    cluster = state.load(directory)
    if cluster is None:
        raise FailedPrecondition(f"no dev cluster in {directory}: start one with "
                                 f"volkin dev up --dir {directory}")
    return cluster
