"""How each kind of component is started, and how we know it is healthy.

    etcd        Debian's etcd from PATH; healthy when GET /health says so
    agent       `python3 -m agent` (volkin-agent); healthy when it logged
                event=agent.serving, answers gRPC health and is registered in etcd
    controller  `python3 -m controller` (volkin-controller); healthy when it logged
                event=controller.serving and answers gRPC health

Agents and the controller start on port 0 the first time and report the ports they
bound in their serving line; later starts reuse those ports, so addresses stay put.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import volkin
import volkin.tls
from volkin import etcd
from volkin.devcluster import certs as devcerts
from volkin.devcluster import processes
from volkin.devcluster.certs import ADMIN, NODE
from volkin.devcluster.state import ClusterState, Component
from volkin.errors import FailedPrecondition
from volkin.tls import Tls, etcd_server_flags

HOST = "127.0.0.1"
ETCD_PREFIX = "/volkin"
# Short leases: in a one-machine cluster a restarted agent or controller should not
# wait long for its predecessor's lease (the controller takes over only after it expires).
AGENT_LEASE_TTL = 5
CONTROLLER_LEASE_TTL = 5
# Environment variables the daemons would read as settings: the dev cluster's
# flags must be the whole story, whatever the caller's shell holds.
_SCRUBBED_ENV = ("ETCD_", "VOLKIN_AGENT_", "VOLKIN_CONTROLLER", "VOLKIN_TLS_")
_SERVING = {
    "agent": re.compile(r"event=agent\.serving .*?address=(\S+) metrics=(\S+)"),
    "controller": re.compile(r"event=controller\.serving .*?admin=(\S+) nbd=(\S+)"),
}
_EXTRA = {"etcd": "peer", "agent": "metrics", "controller": "nbd"}


class ComponentFailed(FailedPrecondition):
    """A component did not become healthy; the message names it and its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def log_path(directory: Path, component: Component) -> Path:
    return directory / "logs" / f"{component.name}.log"


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if not found:
        raise FailedPrecondition("etcd is not on PATH: install it (Debian: apt-get install "
                                 "etcd-server) or add its directory to PATH")
    return found


def _with_port(address: str, default_port: int = 0) -> str:
    return address or f"{HOST}:{default_port}"


def command(directory: Path, state: ClusterState, component: Component) -> list[str]:
    """The command line that starts `component` with its recorded addresses."""
    certs = devcerts.of(directory, state.tls)
    tls_flags = certs.flags(NODE) if certs else []
    if component.kind == "etcd":
        if not component.address:
            component.address = f"{HOST}:{free_port()}"
            component.extra["peer"] = f"{HOST}:{free_port()}"
        scheme = "https" if certs else "http"
        client, peer = f"{scheme}://{component.address}", f"http://{component.extra['peer']}"
        return [etcd_binary(), "--name", "volkin-dev", "--data-dir", str(directory / "etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"volkin-dev={peer}", "--log-level", "warn", "--logger", "zap",
                *etcd_server_flags(certs.tls(NODE) if certs else None)]
    endpoint = state.by_kind("etcd")[0].address
    if component.kind == "agent":
        return [sys.executable, "-m", "agent", "--node-id", component.name,
                "--data-dir", str(directory / component.name),
                "--listen", _with_port(component.address),
                "--metrics-listen", _with_port(component.extra.get("metrics", "")),
                "--etcd-endpoints", endpoint, "--etcd-prefix", ETCD_PREFIX,
                "--lease-ttl", str(AGENT_LEASE_TTL), *tls_flags]
    if component.kind == "controller":
        return [sys.executable, "-m", "controller", "--node-id", component.name,
                "--listen", _with_port(component.address),
                "--nbd-listen", _with_port(component.extra.get("nbd", "")),
                "--metrics-listen", f"{HOST}:0",
                "--etcd-endpoints", endpoint, "--etcd-prefix", ETCD_PREFIX,
                "--lease-ttl", str(CONTROLLER_LEASE_TTL), *tls_flags,
                *(["--tls-admins", ADMIN] if certs else [])]
    raise ValueError(f"unknown component kind {component.kind!r}")


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV)}
    # The daemons import the same volkin as this CLI, installed or from a checkout.
    root = str(Path(volkin.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class Launch:
    """A component this command just started, and where its log was then."""

    component: Component
    process: subprocess.Popen[bytes]
    log: Path
    log_offset: int
    tls: Tls | None  # what checks its health (the admin certificate), if the cluster has TLS

    def stop(self) -> None:
        """SIGKILL; for a start that failed, there is nothing to shut down gracefully."""
        self.process.kill()
        self.process.wait()


def launch(directory: Path, state: ClusterState, component: Component) -> Launch:
    """Starts `component` detached and records its pid and command line."""
    log = log_path(directory, component)
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    argv = command(directory, state, component)
    process = processes.start_detached(argv, log, environment(), directory)
    component.pid, component.argv = process.pid, argv
    certs = devcerts.of(directory, state.tls)
    return Launch(component, process, log, offset, certs.tls(ADMIN) if certs else None)


def _log_tail(log: Path, offset: int, lines: int = 1) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    tail = [line.strip() for line in text.strip().splitlines()[-lines:]]
    return " | ".join(tail)


def _failed(started: Launch, why: str) -> ComponentFailed:
    tail = _log_tail(started.log, started.log_offset)
    last = f"; its log ends: {tail}" if tail else ""
    return ComponentFailed(f"{started.component.name} {why}{last} (log: {started.log})")


def wait_healthy(started: Launch, deadline: float) -> None:
    """Waits until the component serves; fills in the addresses it reported."""
    while True:
        if started.process.poll() is not None:
            raise _failed(started, f"exited during start-up (code {started.process.returncode})")
        if _ready(started):
            return
        if time.monotonic() >= deadline:
            raise _failed(started, "did not become healthy in time")
        time.sleep(0.1)


def _ready(started: Launch) -> bool:
    c = started.component
    if c.kind == "etcd":
        return etcd_healthy(c.address, started.tls)
    found = None
    try:
        with open(started.log, "rb") as f:
            f.seek(started.log_offset)
            found = _SERVING[c.kind].search(f.read().decode(errors="replace"))
    except OSError:
        return False
    if not found:
        return False
    c.address, c.extra[_EXTRA[c.kind]] = found.group(1), found.group(2)
    return grpc_healthy(c.address, started.tls)


def etcd_healthy(address: str, tls: Tls | None = None) -> bool:
    url = f"{'https' if tls else 'http'}://{address}/health"
    try:
        with urllib.request.urlopen(url, timeout=1,
                                    context=tls.client_context() if tls else None) as response:
            return b'"health":"true"' in response.read()
    except OSError:
        return False


def grpc_healthy(address: str, tls: Tls | None = None, timeout: float = 1.0) -> bool:
    with volkin.tls.channel(address, tls=tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def registered_agents(etcd_address: str, tls: Tls | None = None) -> dict[str, int]:
    """Agents registered in etcd: node id -> the pid they registered with."""

    async def fetch() -> dict[str, bytes]:
        client = await etcd.connect([etcd_address], tls=tls)
        try:
            return await client.get_prefix(f"{ETCD_PREFIX}/agents/")
        finally:
            await client.close()

    try:
        records = asyncio.run(fetch())
    except etcd.EtcdUnavailable:
        return {}
    found = {}
    for value in records.values():
        try:
            record = json.loads(value)
            found[str(record["node_id"])] = int(record["pid"])
        except (ValueError, KeyError, TypeError):
            continue
    return found
