"""Detached processes that outlive the command that started them, and how to find them again.

A recorded pid alone proves nothing after a while: the process may have died and the
pid been reused. A component counts as running only if /proc/<pid>/cmdline still is
exactly the command line it was started with (a zombie has an empty one).

That test is for processes started by an earlier command. For one this command just
started, the Popen object is the truth: for a moment after exec, /proc/<pid>/cmdline
reads empty.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


def start_detached(argv: Sequence[str], log: Path, env: Mapping[str, str],
                   cwd: Path) -> subprocess.Popen[bytes]:
    """Starts `argv` in its own session (no terminal signals reach it), stdin from
    /dev/null, stdout and stderr appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            cwd=cwd, env=dict(env), start_new_session=True, close_fds=True)


def is_running(pid: int, argv: Sequence[str]) -> bool:
    """True if `pid` is alive and still runs exactly `argv`."""
    if pid <= 0:
        return False
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return bool(raw) and raw.split(b"\0")[:-1] == [a.encode() for a in argv]


def stop(pid: int, argv: Sequence[str], timeout: float) -> bool:
    """SIGTERM, then SIGKILL after `timeout` seconds; True if it had to be killed."""
    if not is_running(pid, argv):
        return False
    _signal(pid, signal.SIGTERM)
    if wait_gone(pid, argv, timeout):
        return False
    _signal(pid, signal.SIGKILL)
    wait_gone(pid, argv, 10.0)
    return True


def wait_gone(pid: int, argv: Sequence[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while is_running(pid, argv):
        _reap(pid)
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    # When this process started the child itself (dev up, then down, in one
    # process), the child's exit leaves a zombie until we collect it.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
