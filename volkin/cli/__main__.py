"""`volkin`: parses the command line, runs one command, turns every failure into one line.

Exit codes: 0 success; 1 the request failed (the controller said no or cannot be
reached, a job failed or was cancelled, a dev component did not start); 2 the
command line is wrong (nothing was sent); 3 `volkin status` found the cluster
unhealthy (an agent down, etcd unhealthy, no leader); 4 `job wait --timeout` ran
out of time before the job ended; 130 interrupted.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Mapping, Sequence

from volkin.cli import commands, dev
from volkin.cli.args import parse
from volkin.cli.client import CommandError, Controller, controller_address
from volkin.config import tls_of
from volkin.errors import InvalidArgument, VolkinError

DEBUG_ENV = "VOLKIN_DEBUG"


def _fail(message: str) -> None:
    # One line, whatever the controller's message looked like.
    print("volkin: " + " ".join(message.split()), file=sys.stderr, flush=True)


def run(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    try:
        args = parse(argv)
        if args.command in dev.COMMANDS:
            return dev.COMMANDS[args.command](args)
        tls = tls_of(args.tls_ca or "", args.tls_cert or "", args.tls_key or "", environ,
                     "--tls-ca/--tls-cert/--tls-key or VOLKIN_TLS_*")
        with Controller(controller_address(args.controller, environ), tls) as controller:
            return commands.COMMANDS[args.command](args, controller)
    except InvalidArgument as exc:
        _fail(exc.message)
        return 2
    except CommandError as exc:
        _fail(exc.message)
        return exc.exit_code
    except VolkinError as exc:
        _fail(exc.message)
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except BrokenPipeError:
        # `volkin job list | head -1`: the reader left; nothing to say, and
        # nothing more to flush into the broken pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if environ.get(DEBUG_ENV):
            traceback.print_exc()
        _fail(f"unexpected error: {type(exc).__name__}: {exc} "
              f"(set {DEBUG_ENV}=1 for the traceback)")
        return 1


def main() -> None:
    sys.exit(run(sys.argv[1:], os.environ))


if __name__ == "__main__":
    main()
