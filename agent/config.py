"""The agent's configuration: flags, then environment, then a TOML file, then defaults.

`load(argv, environ)` is the only place that reads them; everything else receives a
frozen `AgentConfig`. Each setting has one name in all three sources:

    flag --data-dir  ·  env VOLKIN_AGENT_DATA_DIR  ·  file key data_dir
"""

from __future__ import annotations

import argparse
import socket
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

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
    etcd_endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    # Keys live under {etcd_prefix}/agents/{node_id}.
    etcd_prefix: str = "/volkin"
    # Seconds before etcd forgets an agent that stopped renewing its lease.
    lease_ttl: int = 10
    # host:port of the Prometheus endpoint; empty disables it; port 0 picks one.
    metrics_listen: str = "127.0.0.1:9480"
    # Seconds in-flight calls get to finish after SIGTERM.
    shutdown_grace: float = 5.0
    log_level: str = "info"


_HELP = {
    "node_id": "unique name of this storage node (default: host name)",
    "data_dir": "directory of the block store (extent files and their metadata)",
    "listen": "host:port of the gRPC server; port 0 picks a free port",
    "advertise": "host:port that peers and controllers dial (default: the bound address)",
    "etcd_endpoints": "comma-separated etcd host:port list",
    "etcd_prefix": "etcd key prefix",
    "lease_ttl": "seconds before etcd drops the registration of a silent agent",
    "metrics_listen": "host:port of the Prometheus endpoint; empty disables it",
    "shutdown_grace": "seconds in-flight calls get to finish on SIGTERM",
    "log_level": "debug, info, warning or error",
}


def _convert(name: str, raw: Any) -> Any:
    """Turns a flag, env or file value into the field's type."""
    try:
        if name == "data_dir":
            return Path(str(raw))
        if name == "etcd_endpoints":
            items = raw if isinstance(raw, list) else str(raw).split(",")
            endpoints = tuple(str(e).strip() for e in items if str(e).strip())
            if not endpoints:
                raise ValueError("no endpoint")
            return endpoints
        if name == "lease_ttl":
            ttl = int(raw)
            if ttl < 1:
                raise ValueError("must be at least 1")
            return ttl
        if name == "shutdown_grace":
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"setting {name}={raw!r} is invalid: {exc}") from exc


def _check_address(name: str, value: str, allow_empty: bool) -> None:
    if allow_empty and not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"setting {name}={value!r} is not host:port")


def load(argv: Sequence[str], environ: Mapping[str, str]) -> AgentConfig:
    """Builds the configuration; raises InvalidArgument with the offending setting."""
    parser = argparse.ArgumentParser(
        prog="volkin-agent",
        description="volkin storage agent: serves this node's block store over gRPC.",
    )
    parser.add_argument("--config", help="TOML file with the same keys as the flags "
                        f"(env {ENV_PREFIX}CONFIG)")
    names = [f.name for f in fields(AgentConfig)]
    for name in names:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=_HELP[name])
    args = vars(parser.parse_args(list(argv)))

    from_file: dict[str, Any] = {}
    config_path = args["config"] or environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        try:
            with open(config_path, "rb") as f:
                from_file = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"config file {config_path}: {exc}") from exc
        unknown = sorted(set(from_file) - set(names))
        if unknown:
            raise InvalidArgument(f"config file {config_path}: unknown keys {unknown}")

    chosen: dict[str, Any] = {}
    for name in names:
        env_value = environ.get(ENV_PREFIX + name.upper())
        for raw in (args[name], env_value, from_file.get(name)):
            if raw is not None:
                chosen[name] = _convert(name, raw)
                break
    chosen.setdefault("node_id", socket.gethostname())
    if "data_dir" not in chosen:
        raise InvalidArgument(f"the data directory is required: --data-dir or "
                              f"{ENV_PREFIX}DATA_DIR or data_dir in the config file")
    config = AgentConfig(**chosen)
    _check_address("listen", config.listen, allow_empty=False)
    _check_address("advertise", config.advertise, allow_empty=True)
    _check_address("metrics_listen", config.metrics_listen, allow_empty=True)
    if not config.node_id or "/" in config.node_id:
        raise InvalidArgument(f"node_id {config.node_id!r} must be non-empty without '/'")
    return config


def advertised_address(config: AgentConfig, bound_port: int) -> str:
    """The address others dial: `advertise`, else the listen host with the bound port."""
    if config.advertise:
        return config.advertise
    host = config.listen.rpartition(":")[0]
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = socket.getfqdn()
    return f"{host}:{bound_port}"


def env_names() -> list[str]:
    """Every environment variable the agent reads (for the docs and --help)."""
    return [ENV_PREFIX + "CONFIG"] + [ENV_PREFIX + f.name.upper() for f in fields(AgentConfig)]

