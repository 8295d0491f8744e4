"""Daemon settings: flags, then environment, then a TOML file, then defaults.

Both daemons describe their settings as a frozen dataclass; `load_settings`
fills one from the four sources, in that order, with one name per setting in
all of them (flag `--data-dir`, env `<PREFIX>DATA_DIR`, file key `data_dir`).
A bad value is an `InvalidArgument` naming the setting.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from volkin.errors import InvalidArgument
from volkin.tls import Tls, from_settings

T = TypeVar("T")


def load_settings(cls: type[T], *, prog: str, description: str, env_prefix: str,
                  help: Mapping[str, str], convert: Callable[[str, Any], Any],
                  argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given in any source, converted; the caller adds defaults it derives."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="TOML file with the same keys as the flags "
                        f"(env {env_prefix}CONFIG)")
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for name in names:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=help[name])
    args = vars(parser.parse_args(list(argv)))

    from_file: dict[str, Any] = {}
    config_path = args["config"] or environ.get(env_prefix + "CONFIG")
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
        for raw in (args[name], environ.get(env_prefix + name.upper()), from_file.get(name)):
            if raw is not None:
                try:
                    chosen[name] = convert(name, raw)
                except (TypeError, ValueError) as exc:
                    raise InvalidArgument(f"setting {name}={raw!r} is invalid: {exc}") from exc
                break
    return chosen


def endpoints(raw: Any) -> tuple[str, ...]:
    """A comma-separated string (flag, env) or a list (file) of host:port."""
    items = raw if isinstance(raw, list) else str(raw).split(",")
    found = tuple(str(e).strip() for e in items if str(e).strip())
    if not found:
        raise ValueError("no endpoint")
    return found


# A volume's block size: the unit of maps, copies and locks. Smaller blocks make maps
# and per-block work grow (a 1 TiB volume of 512-byte blocks has 2^31 of them); a larger
# one makes the first write after a snapshot copy that much.
MIN_BLOCK_SIZE = 4 << 10
MAX_BLOCK_SIZE = 16 << 20


def check_block_size(block_size: int) -> None:
    """Raises InvalidArgument unless `block_size` is a power of two from 4 KiB to 16 MiB."""
    if not (MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE
            and block_size & (block_size - 1) == 0):
        raise InvalidArgument(f"block size {block_size} must be a power of two from 4KiB to "
                              f"16MiB, for example 64KiB")


def positive_int(raw: Any) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def check_address(name: str, value: str, allow_empty: bool = False) -> None:
    if allow_empty and not value:
        return
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"setting {name}={value!r} is not host:port")


def env_names(cls: type[Any], env_prefix: str) -> list[str]:
    """Every environment variable a daemon reads (for the docs and --help)."""
    return [env_prefix + "CONFIG"] + [env_prefix + f.name.upper() for f in fields(cls)]


TLS_HELP = {
    "tls_ca": "PEM file of the cluster's CA: peers' certificates must be signed by it "
              "(env VOLKIN_TLS_CA is the default of all volkin programs)",
    "tls_cert": "PEM file of this node's certificate (default env VOLKIN_TLS_CERT)",
    "tls_key": "PEM file of this node's private key (default env VOLKIN_TLS_KEY)",
}


def tls_of(ca: str, cert: str, key: str, environ: Mapping[str, str],
           what: str = "settings") -> Tls | None:
    """The process's TLS from its settings (else VOLKIN_TLS_*), checked now: a missing
    file or an expired certificate is an InvalidArgument, not a failed handshake later."""
    found = from_settings(ca, cert, key, what, environ)
    if found is not None:
        found.check()
    return found
