"""Giving the node a block device for a volume's NBD export, and taking it away.

Two ways, chosen once at start-up (`choose`):
- **kernel**: where the kernel has NBD (`/sys/module/nbd`, or `modprobe nbd` loads it),
  `nbd-client` connects a free /dev/nbdN to the export.
- **fuse**: where it has not, `qemu-storage-daemon` connects to the export and exports it
  as a FUSE file, and `losetup` makes that file a loop device.

What an attachment made is written to disk by the node service before anything else
uses the device (`Attachment.to_json`), so that a NodeUnstage after a restart of the
driver still finds and detaches it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from volkin import nbdargs
from volkin.csi.commands import run
from volkin.errors import StorageIOError
from volkin.log import event

_log = logging.getLogger("volkin.csi.attach")
_WAIT = 15.0
_POLL = 0.05


@dataclass(frozen=True)
class Attachment:
    volume: str
    method: str  # "kernel" or "fuse"
    device: str  # /dev/nbdN or /dev/loopN
    # fuse only: the qemu-storage-daemon process and the file it exports.
    pid: int = 0
    export_file: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Attachment:
        return cls(**raw)


class Attacher(Protocol):
    method: str

    async def attach(self, volume: str, workdir: Path) -> Attachment:
        """Connects the volume's export; returns the device once it has the volume's size."""

    async def detach(self, attachment: Attachment) -> None:
        """Disconnects; does nothing for what is already gone (after a reboot, say)."""


def _split(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), port


# -- the kernel's NBD client ---------------------------------------------------------
def nbd_client_command(nbd: str, export: str, device: str,
                       tls_dir: Path | None = None) -> list[str]:
    host, port = _split(nbd)
    # -N: the export's name (fixed newstyle); -b 4096: the block size the kernel uses.
    tls = ["-cacertfile", str(tls_dir / nbdargs.CA_FILE),
           "-certfile", str(tls_dir / nbdargs.CERT_FILE),
           "-keyfile", str(tls_dir / nbdargs.KEY_FILE), "-tlshostname", host] if tls_dir else []
    return ["nbd-client", host, port, device, "-N", export, "-b", "4096", *tls]


def free_nbd_device(sys_block: Path = Path("/sys/block")) -> str:
    """A /dev/nbdN that no client holds (no `pid` file, as the kernel shows it)."""
    found = sorted((p for p in sys_block.glob("nbd*") if p.name[3:].isdigit()),
                   key=lambda p: int(p.name[3:]))
    for dev in found:
        if not (dev / "pid").exists():
            return f"/dev/{dev.name}"
    raise StorageIOError("every /dev/nbd device is in use; load nbd with more "
                         "(modprobe nbd nbds_max=…)")


class KernelNbd:
    method = "kernel"

    def __init__(self, nbd: str, tls_dir: Path | None = None) -> None:
        self._nbd = nbd
        self._tls_dir = tls_dir
        # Two volumes staged at once must not pick the same free device.
        self._choosing = asyncio.Lock()

    async def attach(self, volume: str, workdir: Path) -> Attachment:
        async with self._choosing:
            device = free_nbd_device()
            await run(*nbd_client_command(self._nbd, volume, device, self._tls_dir))
        return Attachment(volume, self.method, device)

    async def detach(self, attachment: Attachment) -> None:
        name = Path(attachment.device).name
        if (Path("/sys/block") / name / "pid").exists():
            await run("nbd-client", "-d", attachment.device)


# -- qemu-storage-daemon's FUSE export and a loop device ----------------------------------
# Seconds qemu-storage-daemon holds I/O and reconnects after losing the NBD connection
# (a controller restarting, a standby taking over) before failing requests with EIO.
RECONNECT_DELAY = 30


def qsd_command(nbd: str, export: str, export_file: Path, pidfile: Path,
                tls_dir: Path | None = None) -> list[str]:
    tls = ["--object", nbdargs.tls_object(tls_dir)] if tls_dir else []
    return ["qemu-storage-daemon", *tls,
            "--blockdev", f"{nbdargs.blockdev(nbd, export, tls_dir)},node-name=volume,"
                          f"reconnect-delay={RECONNECT_DELAY}",
            "--export", f"type=fuse,id=fuse,node-name=volume,mountpoint={export_file},"
                        "writable=on",
            "--pidfile", str(pidfile), "--daemonize"]


def _is_qsd(pid: int, export_file: str) -> bool:
    """Whether `pid` is still the daemon exporting `export_file` (not a reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and argv[0].endswith(b"qemu-storage-daemon") and any(
        export_file.encode() in a for a in argv)


def _loop_backing(device: str) -> str:
    try:
        return (Path("/sys/block") / Path(device).name / "loop" / "backing_file").read_text(
            ).strip()
    except OSError:
        return ""


class FuseLoop:
    method = "fuse"

    def __init__(self, nbd: str, tls_dir: Path | None = None) -> None:
        self._nbd = nbd
        self._tls_dir = tls_dir

    async def attach(self, volume: str, workdir: Path) -> Attachment:
        workdir.mkdir(parents=True, exist_ok=True)
        export_file, pidfile = workdir / "export", workdir / "qsd.pid"
        export_file.touch()  # the FUSE export mounts over a regular file
        pidfile.unlink(missing_ok=True)
        # --daemonize returns once the export is mounted (or fails and says why).
        await run(*qsd_command(self._nbd, volume, export_file, pidfile, self._tls_dir))
        pid = int(pidfile.read_text().strip())
        attachment = Attachment(volume, self.method, "", pid, str(export_file))
        try:
            _, out = await run("losetup", "--find", "--show", str(export_file))
        except StorageIOError:
            await self.detach(attachment)
            raise
        return Attachment(volume, self.method, out.strip(), pid, str(export_file))

    async def detach(self, attachment: Attachment) -> None:
        # The loop device first (it holds the FUSE file open), then the daemon, which
        # flushes to the export and unmounts the FUSE file as it exits.
        if attachment.device and _loop_backing(attachment.device) == attachment.export_file:
            await run("losetup", "-d", attachment.device)
        if attachment.pid and _is_qsd(attachment.pid, attachment.export_file):
            os.kill(attachment.pid, signal.SIGTERM)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + _WAIT
            while _is_qsd(attachment.pid, attachment.export_file):
                if loop.time() > deadline:
                    raise StorageIOError(f"qemu-storage-daemon {attachment.pid} exporting "
                                         f"{attachment.volume} did not exit")
                await asyncio.sleep(_POLL)
        if attachment.export_file:
            await _release_fuse_file(attachment.export_file)


async def _release_fuse_file(export_file: str) -> None:
    """Unmounts a FUSE export left behind by a daemon that died, then removes the file."""
    with open("/proc/self/mountinfo") as f:
        stale = any(line.split()[4] == export_file for line in f)
    if stale:
        await run("fusermount3", "-u", "-z", export_file)
    Path(export_file).unlink(missing_ok=True)


async def readonly_loop(device: str) -> str:
    """A new read-only loop device over `device`."""
    _, out = await run("losetup", "--find", "--show", "--read-only", device)
    return out.strip()


async def detach_loop(device: str) -> None:
    """Detaches a loop device if it is still attached to something."""
    if _loop_backing(device):
        await run("losetup", "-d", device)


# -- choosing ---------------------------------------------------------------------------
async def kernel_has_nbd() -> bool:
    if Path("/sys/module/nbd").exists():
        return True
    if shutil.which("modprobe") is None:
        return False
    try:
        code, _ = await run("modprobe", "nbd", ok=(0, 1))
    except StorageIOError:
        return False
    return code == 0 and Path("/sys/module/nbd").exists()


async def choose(setting: str, nbd: str, tls_dir: Path | None = None) -> Attacher:
    """The attacher `setting` names; `auto` picks the kernel's NBD where it is there. The
    choice and its reason are logged. With `tls_dir` (ca-cert.pem, client-cert.pem,
    client-key.pem) the NBD connection is TLS."""
    chosen: Attacher
    if setting == "kernel":
        chosen, reason = KernelNbd(nbd, tls_dir), "configured"
    elif setting == "fuse":
        chosen, reason = FuseLoop(nbd, tls_dir), "configured"
    elif await kernel_has_nbd() and shutil.which("nbd-client"):
        chosen, reason = (KernelNbd(nbd, tls_dir),
                          "the kernel has nbd and nbd-client is installed")
    else:
        chosen, reason = (FuseLoop(nbd, tls_dir),
                          "no kernel nbd (or no nbd-client): FUSE and loop")
    event(_log, "csi.attach_method", method=chosen.method, reason=reason)
    return chosen


def attacher_for(method: str, nbd: str) -> Attacher:
    """The attacher that detaches what `method` attached (whatever is chosen now; detaching
    needs no connection)."""
    return KernelNbd(nbd) if method == "kernel" else FuseLoop(nbd)


def dump(attachment: Attachment) -> str:
    return json.dumps(attachment.to_json(), sort_keys=True)
