"""fio with its `nbd` engine, for the benchmarks: start a job, read its JSON result.

    result = fio_result(start_fio("nbd://127.0.0.1:10809/V1", "--rw=randread", "--bs=4k",
                                  "--iodepth=16", "--size=1g", "--runtime=10", "--time_based"))
    result.iops, result.p99, result.read.bytes

Latencies are fio's completion latencies (`clat`), in seconds. Several jobs
(`--numjobs`) are reported as one (`--group_reporting`), each with its own connection.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Direction:
    """What fio measured for one direction (reads or writes) of a job."""

    iops: float
    bytes: int  # moved during the job
    bandwidth: float  # bytes a second
    mean: float  # completion latency, seconds
    p50: float
    p99: float
    max: float


@dataclass(frozen=True)
class FioResult:
    read: Direction
    write: Direction

    @property
    def iops(self) -> float:
        return self.read.iops + self.write.iops

    @property
    def bytes(self) -> int:
        return self.read.bytes + self.write.bytes

    @property
    def bandwidth(self) -> float:
        return self.read.bandwidth + self.write.bandwidth

    def _worst(self, pick: str) -> float:
        return max((getattr(d, pick) for d in (self.read, self.write) if d.bytes), default=0.0)

    @property
    def mean(self) -> float:
        """The higher mean of the directions that did I/O (a one-direction job's own);
        likewise p50, p99 and max."""
        return self._worst("mean")

    @property
    def p50(self) -> float:
        return self._worst("p50")

    @property
    def p99(self) -> float:
        return self._worst("p99")

    @property
    def max(self) -> float:
        return self._worst("max")


def start_fio(uri: str, *options: str, prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """fio (`ioengine=nbd`) against `uri` with `options` (`--rw=...`, `--bs=...`, ...),
    run by `prefix` if given (`tests.support.tls.fio_nbd`: fio with a client certificate)."""
    return subprocess.Popen(
        [*prefix, "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--randrepeat=0",
         "--group_reporting", "--percentile_list=50:99", "--output-format=json", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def fio_result(process: subprocess.Popen[bytes], timeout: float = 600.0) -> FioResult:
    """Waits for fio; raises RuntimeError with its stderr if it failed."""
    out, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"fio failed: {err.decode()[-2000:]}")
    job = json.loads(out[out.index(b"{"):])["jobs"][0]  # the engine prints lines before it
    if job["error"]:
        raise RuntimeError(f"fio job error {job['error']}: {err.decode()[-2000:]}")
    return FioResult(_direction(job["read"]), _direction(job["write"]))


def _direction(side: dict[str, Any]) -> Direction:
    clat = side["clat_ns"]
    percentiles = clat.get("percentile", {})
    return Direction(iops=float(side["iops"]), bytes=int(side["io_bytes"]),
                     bandwidth=float(side["bw_bytes"]), mean=clat["mean"] / 1e9,
                     p50=percentiles.get("50.000000", 0) / 1e9,
                     p99=percentiles.get("99.000000", 0) / 1e9, max=clat["max"] / 1e9)
