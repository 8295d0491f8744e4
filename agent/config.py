"""The agent's configuration: flags, then environment, then a TOML file, then defaults.

`load(argv, environ)` is the only place that reads them; everything else receives a
frozen `AgentConfig`. Each setting has one name in all three sources:

    flag --data-dir  ·  env VOLKIN_AGENT_DATA_DIR  ·  file key data_dir
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volkin import config
from volkin.errors import InvalidArgument

ENV_PREFIX = "VOLKIN_AGENT_"


@dataclass(frozen=True)
class AgentConfig:
    """Everything one agent process needs to know about itself."""

    node_id: str
    data_dir: Path
    # host:port the gRPC server binds; port 0 picks a free port.
    listen: str = "0.0.0.0:7480"
    # host:port peers and controllers dial; empty means the bound address
    # (with the machine's name when `listen` binds every interface).
    advertise: str = ""
    # host:port of the block data port (volkin.blockwire: reads and writes from the
    # controller); empty: the host of `listen`, a free port. The controller finds it
    # in the registration, as it finds `advertise`.
    data_listen: str = ""
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    # The agent registers at {etcd_prefix}/agents/{node_id} and reads the controller's
    # fencing epoch at {etcd_prefix}/controller/epoch (volkin.keys).
    etcd_prefix: str = "/volkin"
    # Seconds before etcd forgets an agent that stopped renewing its lease.
    lease_ttl: int = 10
    # host:port of the Prometheus endpoint; empty disables it; port 0 picks one.
    metrics_listen: str = "127.0.0.1:9480"
    # Seconds in-flight calls get to finish after SIGTERM.
    shutdown_grace: float = 5.0
    # Seconds a mutation waits for the agent to prove, through etcd, that no newer
    # controller took over, before it fails UNAVAILABLE (see agent/fencing.py).
    fence_wait: float = 5.0
    # mTLS on every channel (volkin.tls): the cluster CA, this node's certificate and
    # key (PEM files); empty: VOLKIN_TLS_CA/_CERT/_KEY, and without those plaintext.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    log_level: str = "info"


_HELP = {
    "node_id": "unique name of this storage node (default: host name)",
    "data_dir": "directory of the block store (extent files and their metadata)",
    "listen": "host:port of the gRPC server; port 0 picks a free port",
    "advertise": "host:port that peers and controllers dial (default: the bound address)",
    "data_listen": "host:port of the block data port (default: the listen host, a free port)",
    "etcd_endpoints": "comma-separated etcd host:port list",
    "etcd_prefix": "etcd key prefix",
    "lease_ttl": "seconds before etcd drops the registration of a silent agent",
    "metrics_listen": "host:port of the Prometheus endpoint; empty disables it",
    "shutdown_grace": "seconds in-flight calls get to finish on SIGTERM",
    "fence_wait": "seconds a mutation waits for the agent to reach etcd (to prove no newer "
                  "controller took over) before it fails UNAVAILABLE",
    "log_level": "debug, info, warning or error",
    **config.TLS_HELP,
}


def _convert(name: str, raw: Any) -> Any:
    """Turns a flag, env or file value into the field's type."""
    if name == "data_dir":
        return Path(str(raw))
    if name == "etcd_endpoints":
        return config.endpoints(raw)
    if name == "lease_ttl":
        return config.positive_int(raw)
    if name == "shutdown_grace":
        return float(raw)
    if name == "fence_wait":
        return _seconds(raw)
    return str(raw)


def _seconds(raw: Any) -> float:
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number of seconds >= 0")
    return value


def load(argv: Sequence[str], environ: Mapping[str, str]) -> AgentConfig:
    """Builds the configuration; raises InvalidArgument with the offending setting."""
    chosen = config.load_settings(
        AgentConfig, prog="volkin-agent",
        description="volkin storage agent: serves this node's block store over gRPC.",
        env_prefix=ENV_PREFIX, help=_HELP, convert=_convert, argv=argv, environ=environ)
    chosen.setdefault("node_id", socket.gethostname())
    if "data_dir" not in chosen:
        raise InvalidArgument(f"the data directory is required: --data-dir or "
                              f"{ENV_PREFIX}DATA_DIR or data_dir in the config file")
    settings = AgentConfig(**chosen)
    config.check_address("listen", settings.listen)
    config.check_address("advertise", settings.advertise, allow_empty=True)
    config.check_address("data_listen", settings.data_listen, allow_empty=True)
    config.check_address("metrics_listen", settings.metrics_listen, allow_empty=True)
    config.tls_of(settings.tls_ca, settings.tls_cert, settings.tls_key, environ)
    if not settings.node_id or "/" in settings.node_id:
        raise InvalidArgument(f"node_id {settings.node_id!r} must be non-empty without '/'")
    return settings


def advertised_address(settings: AgentConfig, bound_port: int) -> str:
    """The address others dial: `advertise`, else the listen host with the bound port."""
    if settings.advertise:
        return settings.advertise
    host = settings.listen.rpartition(":")[0]
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{bound_port}"


def env_names() -> list[str]:
    """Every environment variable the agent reads (for the docs and --help)."""
    return config.env_names(AgentConfig, ENV_PREFIX)
