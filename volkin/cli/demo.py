"""`volkin dev demo`: the main job of the method on a real dev cluster, checked over NBD.

    1. dev up (with mTLS on every channel unless --no-tls); V1 and V2, unrelated
       volumes; qemu-io fills V1 with 0xa1, V2 with 0xb2
    2. snapshot S2 of V2; refresh V2 from V1 (rate-limited, so the copy can be seen)
    3. while the background copy runs: V2 already reads as V1, S2 as V2's old data
       (checked on the first and last MiB, which the copy has not reached yet);
       a write of 0xc3 into V1 does not reach V2 (V2 is V1 as it was at the refresh)
    4. after the copy: V2 == V1 as of the refresh, S2 == V2's old data, V1 has its write

Every step prints the `volkin` command it stands for. Data is read and written by
qemu-io over NBD, the way a VM would; nothing looks inside volkin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import volkin.tls
from volkin import nbdargs
from volkin.api.v1 import admin_pb2
from volkin.cli import commands, output
from volkin.cli.client import CommandError, Controller
from volkin.cli.sizes import format_size
from volkin.devcluster import cluster
from volkin.errors import FailedPrecondition, InvalidArgument

V1, V2, S2 = "V1", "V2", "S2"
OLD_V1, OLD_V2, NEW_V1 = 0xA1, 0xB2, 0xC3
MiB = 1 << 20


@dataclass(frozen=True)
class Check:
    """One claim about the bytes of an export, proven by a qemu-io pattern read."""

    volume: str
    pattern: int
    offset: int
    length: int
    claim: str


def _step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _qemu_io(nbd: str, volume: str, command: str, read_only: bool) -> tuple[bool, str]:
    argv = ["qemu-io", *(["-r"] if read_only else []),
            *nbdargs.qemu(nbd, volume, os.environ.get(nbdargs.ENV_TLS_DIR)), "-c", command]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
    text = (done.stdout + done.stderr).strip()
    ok = done.returncode == 0 and "fail" not in text.lower() and "error" not in text.lower()
    return ok, text


def _write(nbd: str, volume: str, pattern: int, offset: int, length: int) -> None:
    ok, text = _qemu_io(nbd, volume, f"write -P {pattern:#x} {offset} {length}", False)
    if not ok:
        raise CommandError(f"qemu-io could not write {volume} over NBD at {nbd}: {text}")


def _verify(nbd: str, checks: list[Check]) -> bool:
    all_ok = True
    for check in checks:
        ok, text = _qemu_io(nbd, check.volume,
                            f"read -P {check.pattern:#x} {check.offset} {check.length}", True)
        print(f"   {'ok  ' if ok else 'FAIL'}  {check.claim}", flush=True)
        if not ok:
            print("         " + text.replace("\n", "\n         "), flush=True)
        all_ok &= ok
    return all_ok


def _remove_earlier_demo(c: Controller) -> None:
    names = {v.name for v in c.call("list volumes", c.stub.ListVolumes,
                                    admin_pb2.ListVolumesRequest()).volumes}
    for name in (S2, V2, V1):
        if name in names:
            print(f"$ volkin volume delete {name}   # left by an earlier demo", flush=True)
            c.call(f"delete volume {name}", c.stub.DeleteVolume,
                   admin_pb2.DeleteVolumeRequest(name=name))


def run(directory: Path, size: int, rate: int, tls: bool = True) -> int:
    if not shutil.which("qemu-io"):
        raise FailedPrecondition("qemu-io is not on PATH: install it (Debian: apt-get install "
                                 "qemu-utils)")
    if size < 2 * MiB:
        raise InvalidArgument(f"demo volumes need at least 2MiB, not {format_size(size)}")
    if tls and cluster.runs_without_tls(directory):
        print(f"   (the dev cluster in {directory} runs without TLS: the demo uses it as it is; "
              f"dev down first to have TLS)", flush=True)
        tls = False
    _step(f"volkin dev up --dir {directory}{' --tls' if tls else ''}")
    state = cluster.up(directory, None, 60.0,
                       lambda text: print(f"   {text}", flush=True), tls=tls)
    env = cluster.addresses(state, directory)
    os.environ.update(env)  # qemu-io's certificates, as a user's shell would have them
    for name, value in env.items():
        print(f"{name}={value}")
    nbd = env["VOLKIN_NBD"]

    admin_tls = volkin.tls.from_env(env)
    with Controller(env["VOLKIN_CONTROLLER"], admin_tls) as c:
        _remove_earlier_demo(c)
        for name in (V1, V2):
            _step(f"volkin volume create {name} --size {format_size(size)}")
            volume = c.call(f"create volume {name}", c.stub.CreateVolume,
                            admin_pb2.CreateVolumeRequest(name=name, size_bytes=size))
            print(output.volume_table([output.volume_dict(volume)]))

        _step(f"qemu-io over NBD: V1 := {OLD_V1:#x} everywhere, V2 := {OLD_V2:#x} everywhere")
        _write(nbd, V1, OLD_V1, 0, size)
        _write(nbd, V2, OLD_V2, 0, size)

        _step(f"volkin snapshot create {V2} {S2}")
        snap = c.call("create snapshot", c.stub.CreateSnapshot,
                      admin_pb2.CreateSnapshotRequest(source=V2, name=S2))
        print(output.volume_table([output.volume_dict(snap)]))

        _step(f"volkin refresh {V2} --from {V1} --rate {format_size(rate)} --wait")
        began = time.monotonic()
        job = c.call("refresh", c.stub.StartRefresh, admin_pb2.StartRefreshRequest(
            target=V2, source=V1, rate_bytes_per_second=rate))
        print(f"{job.id}   (V2 became a PIT copy of V1 in "
              f"{(time.monotonic() - began) * 1000:.0f} ms; the background copy follows)")

        print(f"   while the copy runs: qemu-io writes {NEW_V1:#x} into V1's first MiB, "
              "and reads all three volumes", flush=True)
        _write(nbd, V1, NEW_V1, 0, MiB)
        tail = size - MiB
        during = _verify(nbd, [
            Check(V2, OLD_V1, 0, 2 * MiB, "V2 reads as V1 did at the refresh (V1's new write "
                  "is not in it)"),
            Check(V2, OLD_V1, tail, MiB, "V2's last MiB, not copied yet, reads as V1's"),
            Check(S2, OLD_V2, 0, 2 * MiB, "S2 reads as V2's old data"),
            Check(S2, OLD_V2, tail, MiB, "S2's last MiB too"),
            Check(V1, NEW_V1, 0, MiB, "V1 has its new write"),
        ])
        state_now = c.call("show job", c.stub.GetJob, admin_pb2.GetJobRequest(id=job.id))
        if state_now.state in (admin_pb2.JOB_STATE_DONE, admin_pb2.JOB_STATE_FAILED):
            print(f"   (the copy finished before these reads did: {state_now.blocks_done} "
                  "blocks; a lower --rate shows it in flight)", flush=True)
        print(f"$ volkin job wait {job.id}", flush=True)
        final = commands.wait_for(c, job.id, sys.stdout)
        if final.state != admin_pb2.JOB_STATE_DONE:
            raise CommandError(f"job {final.id} failed: {final.error or 'no reason given'}")

        _step("after the copy, over NBD")
        after = _verify(nbd, [
            Check(V2, OLD_V1, 0, size, "V2 == V1 as of the refresh"),
            Check(S2, OLD_V2, 0, size, "S2 == V2's old data"),
            Check(V1, NEW_V1, 0, MiB, "V1 kept its write made during the copy"),
            Check(V1, OLD_V1, MiB, size - MiB, "V1 is otherwise unchanged"),
        ])
        volumes = c.call("list volumes", c.stub.ListVolumes, admin_pb2.ListVolumesRequest())
        _step("volkin volume list")
        print(output.volume_table([output.volume_dict(v) for v in volumes.volumes]))

    verdict = during and after
    print(f"\nverdict: {'PASS' if verdict else 'FAIL'}: "
          f"V2 became V1 at once and stayed V1-as-of-the-refresh through the copy; "
          f"S2 kept V2's old {format_size(size)}; V1 stayed writable"
          if verdict else "\nverdict: FAIL (see the lines marked FAIL above)", flush=True)
    print(f"(the cluster keeps running: volkin dev down --dir {directory})")
    return 0 if verdict else 1

