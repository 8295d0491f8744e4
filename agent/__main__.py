"""`volkin-agent`: builds the configuration and calls serve(); nothing else."""

from __future__ import annotations

import asyncio
import os
import sys

from agent.config import load
from agent.server import serve
from volkin import log
from volkin.errors import VolkinError


def main() -> None:
    try:
        config = load(sys.argv[1:], os.environ)
    except VolkinError as exc:
        print(f"volkin-agent: {exc.message}", file=sys.stderr)
        sys.exit(2)
    log.configure(config.log_level)
    try:
        asyncio.run(serve(config))
    except (OSError, RuntimeError, VolkinError) as exc:
        # Start-up failures: data directory or node file unusable, listen address taken.
        print(f"volkin-agent: cannot start: {getattr(exc, 'message', exc)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
