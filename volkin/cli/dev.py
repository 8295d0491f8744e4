"""`volkin dev up/status/down/demo`: the dev cluster's command line.

Results go to stdout (`VOLKIN_CONTROLLER=…` lines, the status table or JSON), so
`export $(volkin dev up --dir D)` works. What is being done goes to stderr with
--verbose only: a failure is one line on stderr, like every other command's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from volkin.cli import output
from volkin.devcluster import cluster


def _narrator(args: argparse.Namespace) -> Callable[[str], None]:
    def say(text: str) -> None:
        if args.verbose:
            print(f"volkin dev: {text}", file=sys.stderr, flush=True)

    return say


def up(args: argparse.Namespace) -> int:
    state = cluster.up(Path(args.dir), args.agents, args.timeout, _narrator(args),
                       args.new_ports, args.tls)
    for name, value in cluster.addresses(state, Path(args.dir)).items():
        print(f"{name}={value}")
    return 0


def status(args: argparse.Namespace) -> int:
    found = cluster.status(Path(args.dir))
    rows = [asdict(c) for c in found]
    if args.output == "json":
        print(output.to_json({"dir": str(Path(args.dir).resolve()), "components": rows}))
    else:
        print(output.component_table(rows))
    return 0


def down(args: argparse.Namespace) -> int:
    cluster.down(Path(args.dir), args.timeout, _narrator(args))
    return 0


def demo(args: argparse.Namespace) -> int:
    from volkin.cli.demo import run  # the demo's imports only when asked

    return run(Path(args.dir), args.size, args.rate, args.tls)


COMMANDS = {"dev.up": up, "dev.status": status, "dev.down": down, "dev.demo": demo}
