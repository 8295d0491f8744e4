"""`volkin-csi`: builds the configuration and calls serve(); nothing else."""

from __future__ import annotations

import asyncio
import os
import sys

from volkin import log
from volkin.csi.config import load
from volkin.csi.server import serve
from volkin.errors import VolkinError


def main() -> None:
    try:
        config = load(sys.argv[1:], os.environ)
    except VolkinError as exc:
        print(f"volkin-csi: {exc.message}", file=sys.stderr)
        sys.exit(2)
    log.configure(config.log_level)
    try:
        asyncio.run(serve(config))
    except (OSError, RuntimeError, VolkinError) as exc:
        print(f"volkin-csi: cannot start: {getattr(exc, 'message', exc)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
