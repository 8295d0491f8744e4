"""The command line of `volkin`: every command, its flags, and usage errors as values.

`parse(argv)` returns the namespace with `command` naming the handler
("volume.create", "dev.up", …) or raises `UsageError` with one readable line;
argparse never prints usage or exits on its own except for `--help`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import NoReturn

from volkin.cli.sizes import parse_rate, parse_size
from volkin.config import check_block_size
from volkin.errors import InvalidArgument

DEFAULT_AGENTS = 3


class UsageError(InvalidArgument):
    """The command line is wrong (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("volkin").strip()
        where = f"{command}: " if command else ""
        raise UsageError(f"{where}{message} (see: {self.prog} --help)")


def _typed(parse: Callable[[str], int]) -> Callable[[str], int]:
    """An argparse type that keeps our message instead of 'invalid value'."""

    def convert(text: str) -> int:
        try:
            return parse(text)
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    convert.__name__ = parse.__name__
    return convert


def _block_size(text: str) -> int:
    size = parse_size(text, "block size")
    check_block_size(size)
    return size


def _stripe_unit(text: str) -> int:
    size = parse_size(text, "stripe unit")
    if size < 4096 or size & (size - 1):
        raise InvalidArgument(f"stripe unit {text!r} must be a power of two of at least 4KiB")
    return size


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0 seconds")
    return value


def _common(controller: bool, output: bool) -> list[_Parser]:
    """Flags every leaf command repeats, so they work after the command too."""
    parents = []
    if controller:
        p = _Parser(add_help=False)
        # SUPPRESS: a leaf's unset flag must not overwrite the top-level one.
        p.add_argument("--controller", default=argparse.SUPPRESS, metavar="HOST:PORT",
                       help="admin address of the controller (env VOLKIN_CONTROLLER)")
        _tls_flags(p, argparse.SUPPRESS)
        parents.append(p)
    if output:
        p = _Parser(add_help=False)
        p.add_argument("-o", "--output", choices=["table", "json"], default=argparse.SUPPRESS,
                       help="output format (default: table)")
        parents.append(p)
    return parents


def _tls_flags(p: _Parser, default: str | None) -> None:
    for name, what in (("ca", "the cluster's CA"), ("cert", "your client certificate"),
                       ("key", "your certificate's key")):
        p.add_argument(f"--tls-{name}", default=default, metavar="PEM",
                       help=f"{what}, for mTLS (env VOLKIN_TLS_{name.upper()})")


def _group(sub: argparse._SubParsersAction[_Parser], name: str, help_text: str
           ) -> argparse._SubParsersAction[_Parser]:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)


def build() -> _Parser:
    # No abbreviations: `dev up --tls` must not read as an abbreviation of --tls-ca.
    root = _Parser(prog="volkin", allow_abbrev=False,
                   description="volkin admin CLI: volumes, PIT snapshots, "
                   "instant refresh, background jobs, and a local dev cluster.")
    root.add_argument("--controller", default=None, metavar="HOST:PORT",
                      help="admin address of the controller (env VOLKIN_CONTROLLER)")
    _tls_flags(root, None)
    root.add_argument("-o", "--output", choices=["table", "json"], default="table",
                      help="output format of listing and show commands (default: table)")
    top = root.add_subparsers(dest="group", metavar="COMMAND", required=True)
    admin = _common(controller=True, output=True)

    def leaf(sub: argparse._SubParsersAction[_Parser], name: str, command: str,
             help_text: str, parents: list[_Parser]) -> _Parser:
        parser = sub.add_parser(name, help=help_text, description=help_text, parents=parents)
        parser.set_defaults(command=command)
        return parser

    volume = _group(top, "volume", "create, list, show, resize and delete volumes")
    p = leaf(volume, "create", "volume.create", "create an empty thin volume", admin)
    p.add_argument("name")
    p.add_argument("--size", required=True, type=_typed(parse_size),
                   help="size, e.g. 64MiB or 1GiB; a multiple of the block size")
    p.add_argument("--block-size", type=_typed(_block_size), default=0,
                   help="block size, a power of two from 4KiB to 16MiB, e.g. 64KiB "
                        "(default: the controller's)")
    p.add_argument("--stripe-unit", type=_typed(_stripe_unit), default=0,
                   help="stripe unit, a power of two and a multiple of the block size, "
                        "e.g. 1MiB (default: the controller's, 1MiB)")
    p.add_argument("--stripe-width", type=_positive, default=0,
                   help="agents to stripe the volume over (default: all, up to 8)")
    leaf(volume, "list", "volume.list", "list every volume", admin)
    p = leaf(volume, "show", "volume.show", "show one volume", admin)
    p.add_argument("name")
    p = leaf(volume, "resize", "volume.resize",
             "grow a volume (new blocks read as zeros; NBD clients already connected keep "
             "the old size until they reconnect)", admin)
    p.add_argument("name")
    p.add_argument("--size", required=True, type=_typed(parse_size),
                   help="the new size, e.g. 2GiB; a multiple of the block size, not smaller "
                        "than now")
    p = leaf(volume, "delete", "volume.delete", "delete a volume", admin)
    p.add_argument("name")
    p.add_argument("--force", action="store_true",
                   help="delete even while NBD clients are connected (their connections "
                        "are closed)")

    snapshot = _group(top, "snapshot", "PIT snapshots")
    p = leaf(snapshot, "create", "snapshot.create",
             "NAME becomes a PIT copy of SOURCE, usable at once", admin)
    p.add_argument("source")
    p.add_argument("name")
    p = leaf(snapshot, "materialize", "snapshot.materialize",
             "copy every block NAME still reads through its source into its own memory "
             "(makes it real); prints the background job's id", admin)
    p.add_argument("name")
    p.add_argument("--wait", action="store_true", help="show progress until the copy is done")
    p.add_argument("--rate", type=_typed(parse_rate), default=0, metavar="BYTES_PER_S",
                   help="background copy limit, e.g. 16MiB (default: unlimited)")

    p = leaf(top, "refresh", "refresh",
             "TARGET becomes a PIT copy of SOURCE at once; prints the background job's id", admin)
    p.add_argument("target")
    p.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                   help="the volume (or snapshot) TARGET becomes a copy of")
    p.add_argument("--wait", action="store_true", help="show progress until the copy is done")
    p.add_argument("--rate", type=_typed(parse_rate), default=0, metavar="BYTES_PER_S",
                   help="background copy limit, e.g. 16MiB (default: unlimited)")

    job = _group(top, "job", "background copy jobs")
    leaf(job, "list", "job.list", "list every job", admin)
    for name, help_text in (("show", "show one job"),
                            ("pause", "pause a running job"),
                            ("resume", "resume a paused job, or retry a failed or cancelled "
                                       "one"),
                            ("cancel", "stop a job for good; its target keeps reading the "
                                       "blocks not yet copied through its source")):
        p = leaf(job, name, f"job.{name}", help_text, admin)
        p.add_argument("id")
    p = leaf(job, "wait", "job.wait", "show progress until the job is done, failed or "
             "cancelled", admin)
    p.add_argument("id")
    p.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="give up waiting after this long (exit code 4; the job goes on)")
    p = leaf(job, "set-rate", "job.set-rate", "change a job's background copy limit", admin)
    p.add_argument("id")
    p.add_argument("rate", type=_typed(parse_rate), metavar="RATE",
                   help="bytes per second, e.g. 16MiB; 0 means unlimited")

    leaf(top, "status", "status", "is the cluster healthy? the leader, etcd, the agents, the "
         "jobs (exit code 3 if not)", admin)
    agent = _group(top, "agent", "the storage nodes' agents")
    leaf(agent, "list", "agent.list", "list every agent: address, alive, capacity, used",
         admin)

    dev = _group(top, "dev", "a local dev cluster: etcd, agents and a controller on loopback")
    dir_help = "directory of the cluster's state, data and logs"
    p = leaf(dev, "up", "dev.up", "start whatever part of the dev cluster is not running", [])
    p.add_argument("--dir", required=True, help=dir_help)
    p.add_argument("--agents", type=_positive, default=None, metavar="N",
                   help=f"number of agents (default: {DEFAULT_AGENTS}, or as many as before)")
    p.add_argument("--timeout", type=_seconds, default=60.0, metavar="SECONDS",
                   help="how long etcd, then the other components, may take to become "
                   "healthy (default: 60)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say on stderr what is started and when it serves")
    p.add_argument("--new-ports", action="store_true",
                   help="give what it starts new ports instead of the recorded ones (another "
                        "program took one); the data stays")
    p.add_argument("--tls", action="store_true",
                   help="mTLS on every channel (etcd, agents, admin API, NBD) with a throwaway CA "
                        "in DIR/tls; prints VOLKIN_TLS_* for the CLI (kept by later dev up)")
    p = leaf(dev, "status", "dev.status", "show each component: pid, address, running",
             _common(controller=False, output=True))
    p.add_argument("--dir", required=True, help=dir_help)
    p = leaf(dev, "down", "dev.down", "stop every component (SIGTERM, then SIGKILL)", [])
    p.add_argument("--dir", required=True, help=dir_help)
    p.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                   help="how long a component may take to exit before SIGKILL (default: 10)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="say on stderr what is stopped")
    p = leaf(dev, "demo", "dev.demo",
             "bring the dev cluster up and show an instant refresh, checked over NBD", [])
    p.add_argument("--dir", required=True, help=dir_help)
    p.add_argument("--size", type=_typed(parse_size), default=64 << 20,
                   help="size of each demo volume (default: 64MiB)")
    p.add_argument("--rate", type=_typed(parse_rate), default=16 << 20, metavar="BYTES_PER_S",
                   help="background copy limit, so the progress can be seen (default: 16MiB)")
    p.add_argument("--no-tls", dest="tls", action="store_false",
                   help="a cluster without TLS (by default every channel is mTLS, as with "
                        "dev up --tls)")
    return root


def parse(argv: Sequence[str]) -> argparse.Namespace:
    return build().parse_args(list(argv))
