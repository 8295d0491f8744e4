"""Running the node's tools (losetup, mkfs, mount, qemu-storage-daemon, nbd-client)."""

from __future__ import annotations

import asyncio
import logging

from volkin.errors import StorageIOError
from volkin.log import event

_log = logging.getLogger("volkin.csi.commands")


async def run(*argv: str, ok: tuple[int, ...] = (0,)) -> tuple[int, str]:
    """Runs `argv`; returns (exit code, stdout). An exit code outside `ok`, or a tool that
    is not installed, raises StorageIOError naming the command and what it printed."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise StorageIOError(f"{argv[0]} is not installed on this node") from None
    out, err = await process.communicate()
    code = process.returncode if process.returncode is not None else -1
    event(_log, "csi.command", level=logging.DEBUG, argv=" ".join(argv), code=code)
    if code not in ok:
        said = (err or out).decode(errors="replace").strip().splitlines()
        raise StorageIOError(f"{' '.join(argv)} failed (exit {code}): "
                             f"{said[-1] if said else 'no message'}")
    return code, out.decode(errors="replace")
