"""A tiny tmpfs, for tests of what happens when the disk is full.

Mounting needs root. Where it is refused outside CI the test is skipped with
the reason; in CI (CI=true, run as root) a refused mount fails the test, so a
disk-full test can never pass there by not running.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tiny_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    mount.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = f"cannot mount a {size} tmpfs: {result.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
