"""File systems and mounts on the node: make a file system once, mount, bind, unmount."""

from __future__ import annotations

import os
from pathlib import Path

from volkin.csi.commands import run
from volkin.errors import FailedPrecondition, InvalidArgument

_MKFS = {"ext4": ("mkfs.ext4", "-F", "-q"), "xfs": ("mkfs.xfs", "-q")}


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def is_mounted(path: str) -> bool:
    """Whether something is mounted at `path` (in this process's mount namespace)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(_unescape(line.split()[4]) == real for line in f)


async def fs_type(device: str) -> str:
    """The file system on `device`, "" if it holds none (blkid answers 2 then)."""
    code, out = await run("blkid", "-p", "-o", "value", "-s", "TYPE", device, ok=(0, 2))
    return out.strip() if code == 0 else ""


async def ensure_fs(device: str, wanted: str) -> str:
    """Makes a `wanted` file system on `device` unless it holds one already (it is never
    made again: that would wipe the volume); returns the type it holds."""
    found = await fs_type(device)
    if found:
        if found != wanted:
            raise FailedPrecondition(f"the volume holds a {found} file system, not {wanted}; "
                                     f"ask for fsType {found} (volkin never reformats a volume)")
        return found
    if wanted not in _MKFS:
        raise InvalidArgument(f"file system {wanted!r} is not supported: use ext4 or xfs")
    await run(*_MKFS[wanted], device)
    return wanted


async def _ext4_bytes(device: str) -> int:
    _, out = await run("dumpe2fs", "-h", device)
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


async def grow_unmounted_ext4(device: str) -> bool:
    """Grows an ext4 file system that is not mounted to its device's size, if it is
    smaller (a volume expanded while it was not staged); returns whether it grew.
    Offline, because an online ext4 resize needs CAP_SYS_RESOURCE, which a node plugin
    may lack; xfs only grows online (`grow_fs`)."""
    if await fs_type(device) != "ext4" or await _ext4_bytes(device) >= device_size(device):
        return False
    await run("e2fsck", "-f", "-p", device, ok=(0, 1))  # 1: errors corrected
    await run("resize2fs", device)
    return True


async def grow_fs(device: str, mounted_at: str) -> str:
    """Grows the file system on `device`, mounted at `mounted_at`, to the device's size;
    one that fills it already is left as it is. Returns its type."""
    found = await fs_type(device)
    if found == "ext4":
        if await _ext4_bytes(device) < device_size(device):
            await run("resize2fs", device)  # online (the stage grows it offline first)
    elif found == "xfs":
        await run("xfs_growfs", mounted_at)  # xfs grows through its mount point
    else:
        raise FailedPrecondition(f"{device} holds {found or 'no'} file system; volkin-csi "
                                 f"grows ext4 and xfs")
    return found


async def mount(device: str, path: str, fs: str, flags: list[str]) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    if fs == "xfs" and "nouuid" not in flags:
        # A clone or a snapshot carries its source's file system UUID, and XFS refuses to
        # mount a second file system with a UUID already mounted on the node.
        flags = [*flags, "nouuid"]
    options = ["-o", ",".join(flags)] if flags else []
    await run("mount", "-t", fs, *options, device, path)


async def bind(source: str, target: str, readonly: bool) -> None:
    """Bind-mounts `source` (a directory or a device file) at `target`, read-only if asked;
    the kernel ignores `ro` on the first bind, so it is a remount."""
    await run("mount", "--bind", source, target)
    if readonly:
        await run("mount", "-o", "remount,bind,ro", target)


async def unmount(path: str) -> None:
    """Unmounts `path` if something is mounted there (all stacked mounts; a dead FUSE
    mount too, which fails even a stat)."""
    while is_mounted(path):
        await run("umount", path)


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
