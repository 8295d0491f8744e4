"""The data path (issue 8): volkin's NBD I/O and background copy beside qemu-nbd and nbdcopy.

    python3 -m bench.datapath [--size 1GiB] [--copy-size 1GiB] [--runtime 10] [--rounds 2]
                              [--skip fio|copy|first-write|foreground ...] [--profile DIR]
                              [--job TEXT ...] [--controller-arg ARG ...] [--agents N,...]

Starts a real etcd, two agents and a controller on loopback (`bench.loopback`), and
qemu-nbd (`-f raw --shared=8 --cache=writeback`) on raw files beside them. Every
measure runs volkin and its peer in the same run, interleaved (peer, volkin, peer,
volkin, ...), and reports medians over `--rounds`:

1. fio (`ioengine=nbd`) for `--runtime` seconds per job on a filled volume F of
   `--size`, against a qemu-nbd export of a raw file holding the same bytes: 4 KiB
   random read qd16, 4 KiB random write qd16 and qd1, 1 MiB sequential read and write
   qd4, and 4 KiB random read/write (50/50) over 4 connections of qd4 each. Per job:
   IOPS or MB/s, volkin ÷ qemu-nbd, volkin's p99, and the CPU seconds (user + system,
   from /proc) per GiB moved of the controller, the agents and qemu-nbd;
2. the background copy of a refresh: a filled volume V1 of `--copy-size` refreshed
   into a fresh volume on the other agent with no rate limit, from StartRefresh to
   the job's end, against `nbdcopy --flush` between two qemu-nbd exports (a refresh
   makes its copies durable before it commits them, hence --flush);
3. the first write to a block during a refresh: 4 KiB writes at qd1, each to its own
   block in the upper half of a refresh target, while the refresh, limited to
   `--first-write-rate`, copies from the bottom and never gets there; against the same
   writes to the idle filled volume F. Twice: target alone, and with a snapshot S2 of
   the target (then each first write also pushes the target's old block to S2);
4. foreground latency during a refresh: 4 KiB random reads at qd1 on F while
   refreshes of fresh volumes from V1 run back to back at `volkin refresh`'s default
   rate (none: `--rate` defaults to 0, unlimited), against the same reads alone.

Every fio run and every copy starts after a `sync`: qemu-nbd (`--cache=writeback`)
and the agents leave their writes dirty in the page cache, and the write-back of one
run must not land in the next (the other side's, since they alternate).

`--agents 1,2,3` starts one cluster of each size at once, F striped over all the
agents of each (stripe width = agents, up to 8), and interleaves the fio part over
them too: each round runs qemu-nbd and volkin on the first cluster, then on the
second, and so on. A table at the end sets the clusters side by side: volkin ÷
qemu-nbd, its lowest and highest in one round (the noise), that ratio ÷ the first
cluster's, and how many cores the controller, the agents and fio kept busy. The
other parts need two agents or more.

`--profile DIR` records the controller and the agents holding F with py-spy during one
more, uncounted, volkin run of 4 KiB random write qd16 (or of the first `--job`), and
the controller and both agents during one more refresh copy, and prints their top
functions.
`--keep` leaves the cluster's directory (every process's log) behind.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

import volkin.tls
from bench.fio import FioResult, fio_result, start_fio
from bench.loopback import Loopback
from tests.support.etcd import free_port
from tests.support.tls import Pki, fio_nbd
from volkin import nbdargs
from volkin.api.v1 import admin_pb2, admin_pb2_grpc
from volkin.cli.sizes import format_size, parse_rate, parse_size
from volkin.errors import VolkinError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
MB = 1e6  # fio's MB/s, as in the issue
REPO = Path(__file__).resolve().parents[1]
PARTS = ("fio", "copy", "first-write", "foreground")


# -- what is measured ---------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    label: str
    options: tuple[str, ...]
    throughput: bool  # MB/s rather than IOPS
    goal: float | None  # volkin ÷ qemu-nbd at least
    named_only: bool = False  # runs only when a --job names it


JOBS = (
    Job("4 KiB random read, qd16", ("--rw=randread", "--bs=4k", "--iodepth=16"), False, 0.5),
    Job("4 KiB random write, qd16", ("--rw=randwrite", "--bs=4k", "--iodepth=16"), False, 0.4),
    Job("4 KiB random write, qd1", ("--rw=randwrite", "--bs=4k", "--iodepth=1"), False, 0.4),
    Job("1 MiB sequential read, qd4", ("--rw=read", "--bs=1m", "--iodepth=4"), True, 0.7),
    Job("1 MiB sequential write, qd4", ("--rw=write", "--bs=1m", "--iodepth=4"), True, 0.7),
    Job("4 KiB random r/w 50/50, 4 conns x qd4",
        ("--rw=randrw", "--bs=4k", "--iodepth=4", "--numjobs=4"), False, None),
    # Deep sequential queues, where a striped volume keeps every agent busy at once
    # (16 requests of 1 MiB span 16 stripe units); for the striping runs (--agents).
    Job("1 MiB sequential read, qd16", ("--rw=read", "--bs=1m", "--iodepth=16"), True, None,
        named_only=True),
    Job("1 MiB sequential write, qd16", ("--rw=write", "--bs=1m", "--iodepth=16"), True, None,
        named_only=True),
)
PROFILED = JOBS[1]  # the job py-spy watches unless --job names others


def chosen_jobs(names: Sequence[str]) -> tuple[Job, ...]:
    """The jobs whose label contains one of `names`, in JOBS' order (without names, all
    but those that run only when named)."""
    if not names:
        return tuple(j for j in JOBS if not j.named_only)
    return tuple(j for j in JOBS if any(n in j.label for n in names))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat utime and stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


Processes = Mapping[str, Sequence[int]]  # a name ("controller", "agents") -> its pids


def cpu_of(processes: Processes) -> dict[str, float]:
    return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in processes.items()}


@contextlib.contextmanager
def cpu_used(processes: Processes) -> Iterator[dict[str, float]]:
    """Fills the yielded dict with each name's CPU seconds spent while the block ran."""
    used: dict[str, float] = {}
    before = cpu_of(processes)
    yield used
    after = cpu_of(processes)
    used.update({name: after[name] - before[name] for name in processes})


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Sample:
    """One fio run, and the CPU its server's processes spent meanwhile."""

    result: FioResult
    cpu: Mapping[str, float]
    seconds: float  # fio's whole run, wall clock

    def per_gib(self, name: str) -> float:
        return self.cpu[name] / max(self.result.bytes / GiB, 1e-9)

    def cores(self, name: str) -> float:
        """How many cores `name` kept busy on average during the run."""
        return self.cpu[name] / self.seconds


def run_fio(uri: str, processes: Processes, *options: str) -> Sample:
    os.sync()  # no run pays for the write-back of the one before (see the module's doc)
    children = children_cpu()  # fio's own CPU, once it has been waited for
    prefix: list[str] = []
    if uri.startswith("nbds://"):  # --tls: fio's certificate comes from its HOME instead
        address, _, export = uri[len("nbds://"):].partition("?")[0].partition("/")
        prefix, uri = fio_nbd(address, export)
    with cpu_used(processes) as cpu:
        start = time.monotonic()
        result = fio_result(start_fio(uri, *options, prefix=prefix))
        seconds = time.monotonic() - start
    return Sample(result, {**cpu, "fio": children_cpu() - children}, seconds)


@dataclass(frozen=True)
class JobRuns:
    """One fio job's interleaved rounds: qemu-nbd's and volkin's samples, round by round."""

    job: Job
    theirs: Sequence[Sample]
    ours: Sequence[Sample]

    @property
    def ratio(self) -> float:
        """volkin ÷ qemu-nbd, of the medians."""
        return speed(self.ours, self.job) / speed(self.theirs, self.job)

    def round_ratios(self) -> list[float]:
        """volkin ÷ qemu-nbd within each round: their spread is the run's noise."""
        return [speed([o], self.job) / speed([t], self.job)
                for t, o in zip(self.theirs, self.ours, strict=True)]


# -- TLS (--tls) ----------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchTls:
    client_dir: Path  # ca-cert.pem, client-cert.pem, client-key.pem: nbdcopy, nbdinfo
    server_dir: Path  # ca-cert.pem, server-cert.pem, server-key.pem: qemu-nbd


TLS: BenchTls | None = None


def use_tls(directory: Path) -> BenchTls:
    """One CA for everything: volkin's processes (VOLKIN_TLS_*, read by the tests' helpers
    that start them), the NBD clients and qemu-nbd, which then also demands a client
    certificate (`tls-creds-x509,endpoint=server`), as volkin does."""
    made = Pki.make(directory)
    os.environ.update(made.environment("node"))
    volkin.tls.configure(volkin.tls.from_env())
    server = made.issue("qemu-nbd")
    server_dir = directory / "qemu-nbd"
    server_dir.mkdir()
    for source, name in ((made.ca.cert, "ca-cert.pem"), (server.cert, "server-cert.pem"),
                         (server.key, "server-key.pem")):
        (server_dir / name).write_bytes(source.read_bytes())
    return BenchTls(Path(os.environ[nbdargs.ENV_TLS_DIR]), server_dir)


# -- the peer -------------------------------------------------------------------------------

class QemuNbd:
    """qemu-nbd serving one raw file on a free loopback port (up to 8 connections)."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.port = free_port()
        self.uri = nbdargs.uri(f"127.0.0.1:{self.port}", "img", TLS.client_dir if TLS else None)
        tls = ["--object", f"tls-creds-x509,id=tls0,dir={TLS.server_dir},endpoint=server",
               "--tls-creds", "tls0"] if TLS else []
        self.process = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-x", "img", "-p", str(self.port), "-b", "127.0.0.1",
             *tls, "--persistent", "--shared=8", "--cache=writeback", str(image)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            if subprocess.run(["nbdinfo", "--size", self.uri], capture_output=True).returncode == 0:
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"qemu-nbd on {image} did not start")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(10)


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as out:
        for offset in range(0, size, 64 * MiB):
            out.write(os.urandom(min(64 * MiB, size - offset)))
    return path


def empty_file(path: Path, size: int) -> Path:
    path.unlink(missing_ok=True)
    path.write_bytes(b"")
    os.truncate(path, size)
    return path


def nbdcopy(source: str, destination: str) -> None:
    subprocess.run(["nbdcopy", "--flush", source, destination], check=True,
                   capture_output=True, timeout=3600)


# -- volumes and refreshes --------------------------------------------------------------------

Admin = admin_pb2_grpc.AdminStub


def create_volume(admin: Admin, name: str, size: int, avoid: str = "") -> str:
    """Creates `name` striped over every agent (up to the controller's width) and returns
    its first agent; or, if `avoid` is given, on one agent other than `avoid`. A volume
    goes to the agents with the fewest memories: a small pad volume evens a tie."""
    for pad in range(4):
        volume = admin.CreateVolume(admin_pb2.CreateVolumeRequest(
            name=name, size_bytes=size, stripe_width=1 if avoid else 0))
        if avoid not in volume.agents:
            return str(volume.agents[0])
        admin.DeleteVolume(admin_pb2.DeleteVolumeRequest(name=name))
        admin.CreateVolume(admin_pb2.CreateVolumeRequest(name=f"pad-{name}-{pad}",
                                                         size_bytes=MiB, stripe_width=1))
    raise RuntimeError(f"could not place {name} on another agent than {avoid}")


def delete_volumes(admin: Admin, *names: str) -> None:
    for name in names:
        admin.DeleteVolume(admin_pb2.DeleteVolumeRequest(name=name, force=True))


def watch(admin: Admin, job_id: str) -> admin_pb2.Job:
    """Follows a job until it ends; returns its last state."""
    final: admin_pb2.Job = admin.GetJob(admin_pb2.GetJobRequest(id=job_id))
    for update in admin.WatchJob(admin_pb2.GetJobRequest(id=job_id), timeout=3600):
        final = update
    return final


def finished_at(log: str, job_id: str) -> float:
    """When the controller's log says the job ended (Unix time): exact to the millisecond,
    where WatchJob polls every 0.2 s."""
    found = re.findall(rf"ts=(\S+) level=\w+ event=job\.finished job={re.escape(job_id)} ", log)
    if not found:
        raise RuntimeError(f"the controller never logged the end of job {job_id}")
    stamp = datetime.strptime(found[-1], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    return stamp.timestamp()


def stop_job(admin: Admin, job_id: str) -> admin_pb2.Job:
    """Pauses a job if it still runs (its target is about to be deleted); returns it."""
    job: admin_pb2.Job = admin.GetJob(admin_pb2.GetJobRequest(id=job_id))
    if job.state in (admin_pb2.JOB_STATE_RUNNING, admin_pb2.JOB_STATE_WAITING):
        job = admin.PauseJob(admin_pb2.PauseJobRequest(id=job_id))
    return job


class BackToBack(threading.Thread):
    """Refreshes fresh volumes from `source` one after another, at no rate limit, until
    `stop()`; records when each ran and how much it copied."""

    def __init__(self, admin: Admin, source: str, size: int, avoid: str, tag: str) -> None:
        super().__init__(daemon=True)
        self.admin, self.source, self.size, self.avoid, self.tag = admin, source, size, avoid, tag
        self.spans: list[tuple[float, float]] = []  # monotonic start and end of each refresh
        self.copied = 0  # bytes
        self.running = threading.Event()  # set once the first refresh started
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._watch: Any = None  # the running WatchJob call, to cancel

    def run(self) -> None:
        try:
            for count in range(1_000_000):
                if self._stopping.is_set():
                    return
                name = f"{self.tag}-{count}"
                create_volume(self.admin, name, self.size, self.avoid)
                begin = time.monotonic()
                job = self.admin.StartRefresh(admin_pb2.StartRefreshRequest(
                    target=name, source=self.source))
                self.running.set()
                stream: Any = self.admin.WatchJob(admin_pb2.GetJobRequest(id=job.id),
                                                  timeout=3600)
                self._watch = stream
                if self._stopping.is_set():
                    stream.cancel()
                try:
                    for _ in stream:
                        pass
                except grpc.RpcError as exc:
                    if stream.code() is not grpc.StatusCode.CANCELLED:
                        raise exc
                self.spans.append((begin, time.monotonic()))
                self.copied += stop_job(self.admin, job.id).bytes_copied
                delete_volumes(self.admin, name)
        except BaseException as exc:
            self.error = exc
            self.running.set()

    def stop(self) -> None:
        self._stopping.set()
        if self._watch is not None:
            self._watch.cancel()
        self.join(300)
        if self.error is not None:
            raise self.error

    def share_of(self, begin: float, end: float) -> float:
        """The share of [begin, end] during which a refresh ran."""
        covered = sum(max(0.0, min(end, b) - max(begin, a)) for a, b in self.spans)
        return covered / (end - begin)


# -- profiles -------------------------------------------------------------------------------

@contextlib.contextmanager
def profiled(pids: Mapping[str, int], directory: Path | None) -> Iterator[dict[str, Path]]:
    """py-spy records each process (raw collapsed stacks DIR/NAME.txt, its own summary
    DIR/NAME.log) while the block runs."""
    files: dict[str, Path] = {}
    if directory is None:
        yield files
        return
    directory.mkdir(parents=True, exist_ok=True)
    spies = []
    for name, pid in pids.items():
        files[name] = directory / f"{name}.txt"
        with open(directory / f"{name}.log", "wb") as log:
            spies.append(subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", "100",
                 "--nonblocking", "--output", str(files[name])],
                stdout=log, stderr=subprocess.STDOUT))
    time.sleep(1.0)  # attached
    try:
        yield files
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)
        for spy in spies:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()


_OURS = re.compile(r"\((controller|agent|volkin)/(?!__main__\.py)")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """`write (/repo/agent/dataport.py:88)` -> `write (agent/dataport.py)`."""
    found = _FRAME.match(frame)
    if not found:
        return frame
    path = found.group("file")
    for marker in (f"{REPO}/", "site-packages/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{found.group('function')} ({path})"


def top_functions(raw: Path, top: int = 10) -> tuple[int, list[tuple[str, int]],
                                                     list[tuple[str, int]]]:
    """Samples, the functions that were running (self), and volkin's own functions on the
    stack (total: what they and everything they call cost), each with its samples."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        names = [frame_name(f) for f in stack.split(";")]
        own[names[-1]] += n
        for name in set(names):
            if _OURS.search(name):
                total[name] += n
    return samples, own.most_common(top), total.most_common(top)


@dataclass(frozen=True)
class Profile:
    name: str  # the process
    stacks: Path  # py-spy's collapsed stacks
    seconds: float  # recorded
    cpu: float  # CPU seconds the process used meanwhile (/proc)


def print_profile(profile: Profile) -> None:
    name, raw, seconds, cpu = profile.name, profile.stacks, profile.seconds, profile.cpu
    samples, own, total = top_functions(raw)
    spy = raw.with_suffix(".log").read_text(errors="replace")
    errors = re.findall(r"Samples: \d+ Errors: \d+", spy)
    print(f"\npy-spy of the {name}: {samples} samples of busy threads in {seconds:.1f} s at "
          f"100 Hz ({errors[-1] if errors else 'no summary from py-spy'}); by /proc it used "
          f"{cpu:.1f} CPU s ({100 * cpu / seconds:.0f} % of a core); {raw}")
    for title, rows in (("running (self)", own), ("volkin's functions on the stack (total)",
                                                  total)):
        print(f"  top by {title}:")
        for function, n in rows:
            print(f"    {100 * n / max(samples, 1):5.1f} %  {n:6d}  {function}")


# -- output ---------------------------------------------------------------------------------

def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def speed(samples: Sequence[Sample], job: Job) -> float:
    """Median IOPS, or MB/s for a throughput job."""
    return med([s.result.bandwidth / MB if job.throughput else s.result.iops for s in samples])


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    fio = subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()
    return (f"{os.cpu_count()} cores ({model}), {memory:.0f} GiB, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}, {fio}, "
            f"load average {os.getloadavg()[0]:.2f} at the start")


def commit() -> str:
    """HEAD, and the last commit that changed the code measured (controller, agent, volkin)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True,
                              text=True).stdout.strip()
    code = ("controller", "agent", "volkin")
    dirty = " (and uncommitted changes to it)" if git("status", "--porcelain", "--", *code) else ""
    return (f"{git('rev-parse', '--short', 'HEAD')}; controller, agent and volkin as of "
            f"{git('log', '-1', '--format=%h', '--', *code)}{dirty}")


def log_trouble(work: Path) -> list[str]:
    """Warnings and errors in the cluster's logs: how many per log, and the first few."""
    lines = []
    for log in sorted(work.glob("*.log")):
        found = [line for line in log.read_text(errors="replace").splitlines()
                 if re.search(r"level=(warning|error)|Traceback", line)]
        if found:
            lines.append(f"{log.name}: {len(found)} warning/error lines, e.g.")
            lines += [f"    {line[:200]}" for line in found[:3]]
    return lines


# -- the run ------------------------------------------------------------------------------

@dataclass
class Run:
    """What every part needs: the cluster, the shared volumes, the options, the peers."""

    args: argparse.Namespace
    cluster: Loopback
    nbd: str  # the controller's NBD address
    volkin: Processes  # "controller" and "agents"
    agent_pids: dict[str, int]  # agent node id -> pid
    block_size: int = 0
    f_agent: str = ""  # the first agent holding F, the fio volume
    f_agents: tuple[str, ...] = ()  # every agent F is striped over
    stripe_unit: int = 0  # F's
    stripe_width: int = 0
    fio_runs: list[JobRuns] = field(default_factory=list)  # what measure_fio measured
    v1_agent: str = ""  # the agent holding V1, the refresh source
    peers: list[QemuNbd] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)  # for the log lines

    @property
    def admin(self) -> Admin:
        return self.cluster.controllers[0].stub

    @property
    def work(self) -> Path:
        return self.cluster.work

    @property
    def runtime(self) -> str:
        return f"--runtime={self.args.runtime:g}"

    def uri(self, volume: str) -> str:
        return nbdargs.uri(self.nbd, volume, TLS.client_dir if TLS else None)

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f} s] {text}", flush=True)

    def qemu_nbd(self, image: Path) -> QemuNbd:
        peer = QemuNbd(image)
        self.peers.append(peer)
        return peer

    def stop(self, peer: QemuNbd) -> None:
        peer.stop()
        self.peers.remove(peer)

    def stop_peers(self) -> None:
        for peer in list(self.peers):
            self.stop(peer)


def prepare(run: Run, parts: Sequence[str]) -> None:
    """Fills the volumes the parts share: F (fio; and f.raw, its qemu-nbd twin) and V1 (the
    refresh source; and v1.raw, the source of its nbdcopy peer), each on its own agent."""
    admin, size, copy_size = run.admin, run.args.size, run.args.copy_size
    if {"fio", "first-write", "foreground"} & set(parts):
        image = random_file(run.work / "f.raw", size)
        run.f_agent = create_volume(admin, "F", size)
        volume = admin.GetVolume(admin_pb2.GetVolumeRequest(name="F"))
        run.f_agents = tuple(volume.agents)
        run.stripe_unit, run.stripe_width = volume.stripe_unit_bytes, volume.stripe_width
        nbdcopy(str(image), run.uri("F"))
        run.say(f"F ({format_size(size)}) filled, striped in units of "
                f"{format_size(run.stripe_unit)} over {', '.join(run.f_agents)}")
    if {"copy", "first-write", "foreground"} & set(parts):
        image = random_file(run.work / "v1.raw", copy_size)
        run.v1_agent = create_volume(admin, "V1", copy_size, avoid=run.f_agent)
        nbdcopy(str(image), run.uri("V1"))
        run.say(f"V1 ({format_size(copy_size)}) filled, on {run.v1_agent}")
    run.block_size = admin.GetVolume(admin_pb2.GetVolumeRequest(
        name="F" if run.f_agent else "V1")).block_size


def measure_fio(runs: Sequence[Run]) -> None:
    """1. The fio jobs, qemu-nbd and volkin interleaved; with several clusters (--agents),
    the clusters too: each round runs every cluster's pair in turn, so that a change of
    the machine's load in the middle of the run lands on every cluster alike."""
    peers = [run.qemu_nbd(run.work / "f.raw") for run in runs]
    args = runs[0].args
    for run in runs:
        run.fio_runs.clear()
    for job in chosen_jobs(args.job):
        options = (*job.options, f"--size={args.size}", runs[0].runtime, "--time_based")
        unit = "MB/s" if job.throughput else "IOPS"
        theirs: list[list[Sample]] = [[] for _ in runs]
        ours: list[list[Sample]] = [[] for _ in runs]
        for r in range(args.rounds):
            for n, (run, peer) in enumerate(zip(runs, peers, strict=True)):
                theirs[n].append(run_fio(peer.uri, {"qemu-nbd": [peer.process.pid]},
                                         *options))
                ours[n].append(run_fio(run.uri("F"), run.volkin, *options))
                run.say(f"{job.label}, {len(run.agent_pids)} agent(s), round {r + 1}: "
                        f"qemu-nbd {speed(theirs[n][-1:], job):,.0f}, volkin "
                        f"{speed(ours[n][-1:], job):,.0f} {unit}; volkin p99 "
                        f"{ms(ours[n][-1].result.p99)}")
        for n, run in enumerate(runs):
            run.fio_runs.append(JobRuns(job, theirs[n], ours[n]))
    for run, peer in zip(runs, peers, strict=True):
        run.stop(peer)


def fio_table(run: Run) -> str:
    """What measure_fio measured on one cluster."""
    lines = ["| job | qemu-nbd | volkin | volkin ÷ qemu-nbd | goal | met | volkin p99 "
             "| qemu-nbd p99 | CPU s/GiB: controller | agents | qemu-nbd |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for found in run.fio_runs:
        job, theirs, ours = found.job, found.theirs, found.ours
        unit = "MB/s" if job.throughput else "IOPS"
        ratio = found.ratio
        goal, met = "—", "—"
        if job.goal is not None:
            goal, met = f"≥ {job.goal}", "**yes**" if ratio >= job.goal else "no"
        lines.append(
            f"| {job.label} | {speed(theirs, job):,.0f} {unit} | {speed(ours, job):,.0f} {unit} "
            f"| **{ratio:.2f}** | {goal} | {met} | {ms(med([s.result.p99 for s in ours]))} | "
            f"{ms(med([s.result.p99 for s in theirs]))} | "
            f"{med([s.per_gib('controller') for s in ours]):.1f} | "
            f"{med([s.per_gib('agents') for s in ours]):.1f} | "
            f"{med([s.per_gib('qemu-nbd') for s in theirs]):.2f} |")
    return (f"NBD I/O: fio ioengine=nbd on {format_size(run.args.size)}, {run.args.runtime:g} s "
            f"per run, medians of {run.args.rounds} interleaved rounds; p99 is fio's completion "
            f"latency (for r/w the worse of reads and writes)\n\n" + "\n".join(lines))


def scaling_table(runs: Sequence[Run]) -> str:
    """The fio jobs of clusters with different numbers of agents side by side: one volume
    F striped over all the agents of each, against qemu-nbd, all interleaved."""
    first = {r.job.label: r.ratio for r in runs[0].fio_runs}
    lines = ["| job | agents (stripe width) | qemu-nbd | volkin | volkin ÷ qemu-nbd | rounds "
             f"| ÷ {len(runs[0].agent_pids)} agent(s) | volkin p99 | CPU s/GiB: controller | "
             "agents | cores busy: controller | agents | fio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for job in chosen_jobs(runs[0].args.job):
        for run in runs:
            (found,) = [r for r in run.fio_runs if r.job == job]
            ours, unit = found.ours, "MB/s" if job.throughput else "IOPS"
            spread = sorted(found.round_ratios())
            lines.append(
                f"| {job.label} | {len(run.agent_pids)} ({run.stripe_width}) | "
                f"{speed(found.theirs, job):,.0f} {unit} | {speed(ours, job):,.0f} {unit} | "
                f"**{found.ratio:.2f}** | {spread[0]:.2f} to {spread[-1]:.2f} | "
                f"{found.ratio / first[job.label]:.2f} | "
                f"{ms(med([s.result.p99 for s in ours]))} | "
                f"{med([s.per_gib('controller') for s in ours]):.2f} | "
                f"{med([s.per_gib('agents') for s in ours]):.2f} | "
                f"{med([s.cores('controller') for s in ours]):.2f} | "
                f"{med([s.cores('agents') for s in ours]):.2f} | "
                f"{med([s.cores('fio') for s in ours]):.2f} |")
    return (f"Striping: volume F ({format_size(runs[0].args.size)}) over every agent of "
            f"clusters of {', '.join(str(len(r.agent_pids)) for r in runs)} agents, "
            f"stripe unit {format_size(runs[0].stripe_unit)}; fio {runs[0].args.runtime:g} s "
            f"per run, medians of {runs[0].args.rounds} rounds, each of which runs qemu-nbd "
            f"and volkin on every cluster in turn; "
            f"'rounds' is the lowest and highest volkin ÷ qemu-nbd of one round; "
            f"'÷ N agent(s)' compares the ratios, so that the load of other processes on "
            f"the machine cancels out; cores busy is CPU seconds ÷ fio's wall time\n\n"
            + "\n".join(lines))


def profile_fio(run: Run, directory: Path) -> None:
    """One more volkin run of the profiled job, with py-spy on the controller and every
    agent F is striped over."""
    pids = {"controller": run.volkin["controller"][0],
            **{f"agent-{node}": run.agent_pids[node] for node in run.f_agents}}
    job = chosen_jobs(run.args.job[:1])[0] if run.args.job else PROFILED
    options = (*job.options, f"--size={run.args.size}", run.runtime, "--time_based")
    begin = time.monotonic()
    with cpu_used({name: [pid] for name, pid in pids.items()}) as cpu, \
            profiled(pids, directory) as files:
        sample = run_fio(run.uri("F"), run.volkin, *options)
    run.say(f"profiled run of {job.label}: {sample.result.iops:,.0f} IOPS, "
            f"{sample.result.bandwidth / MB:,.0f} MB/s")
    run.profiles += [Profile(name, raw, time.monotonic() - begin, cpu[name])
                     for name, raw in files.items()]


def measure_copy(run: Run) -> str:
    """2. The refresh's background copy against nbdcopy, interleaved."""
    admin, copy_size = run.admin, run.args.copy_size
    source = run.qemu_nbd(run.work / "v1.raw")
    ours: list[tuple[float, Mapping[str, float]]] = []  # seconds, CPU seconds
    theirs: list[tuple[float, float]] = []
    for r in range(run.args.rounds):
        destination = run.qemu_nbd(empty_file(run.work / "copy.raw", copy_size))
        os.sync()
        children = children_cpu()  # nbdcopy's CPU, once it has been waited for
        with cpu_used({"qemu-nbd": [source.process.pid, destination.process.pid]}) as cpu:
            start = time.perf_counter()
            nbdcopy(source.uri, destination.uri)
            elapsed = time.perf_counter() - start
        theirs.append((elapsed, cpu["qemu-nbd"] + children_cpu() - children))
        run.stop(destination)

        target = f"copy{r}"
        target_agent = create_volume(admin, target, copy_size, avoid=run.v1_agent)
        os.sync()
        with cpu_used(run.volkin) as cpu:
            start = time.time()
            job = admin.StartRefresh(admin_pb2.StartRefreshRequest(target=target, source="V1"))
            final = watch(admin, job.id)
        if final.state != admin_pb2.JOB_STATE_DONE:
            raise RuntimeError(f"the refresh of {target} ended {final}")
        elapsed = finished_at(run.cluster.controllers[0].log(), job.id) - start
        ours.append((elapsed, cpu))
        delete_volumes(admin, target)
        run.say(f"refresh copy round {r + 1}: nbdcopy {theirs[-1][0]:.2f} s, volkin "
                f"{elapsed:.2f} s ({run.v1_agent} → {target_agent})")
    run.stop(source)
    gib = copy_size / GiB
    their_speed = copy_size / MiB / med([t for t, _ in theirs])
    our_speed = copy_size / MiB / med([t for t, _ in ours])
    ratio = our_speed / their_speed
    return (f"Refresh background copy of {format_size(copy_size)} ({run.block_size // KiB} KiB "
            f"blocks, V1 on one agent and the target on the other, no rate limit, StartRefresh "
            f"→ DONE) vs `nbdcopy --flush` qemu-nbd → qemu-nbd; medians of {run.args.rounds} "
            f"interleaved rounds\n\n"
            "| measure | nbdcopy | volkin | volkin ÷ nbdcopy | goal | met | CPU s/GiB: "
            "controller | agents | nbdcopy + qemu-nbd |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| refresh copy | {their_speed:,.0f} MiB/s | {our_speed:,.0f} MiB/s | "
            f"**{ratio:.2f}** | ≥ 0.9 | {'**yes**' if ratio >= 0.9 else 'no'} | "
            f"{med([c['controller'] for _, c in ours]) / gib:.1f} | "
            f"{med([c['agents'] for _, c in ours]) / gib:.1f} | "
            f"{med([c for _, c in theirs]) / gib:.2f} |")


def profile_copy(run: Run, directory: Path) -> None:
    """One more, uncounted, refresh copy with py-spy on the controller and both agents."""
    pids = {"controller": run.volkin["controller"][0],
            **{f"agent-{node}": pid for node, pid in run.agent_pids.items()}}
    create_volume(run.admin, "copyp", run.args.copy_size, avoid=run.v1_agent)
    os.sync()
    begin = time.monotonic()
    with cpu_used({name: [pid] for name, pid in pids.items()}) as cpu, \
            profiled(pids, directory / "copy") as files:
        job = run.admin.StartRefresh(admin_pb2.StartRefreshRequest(target="copyp", source="V1"))
        watch(run.admin, job.id)
    delete_volumes(run.admin, "copyp")
    run.say(f"profiled refresh copy: {time.monotonic() - begin:.1f} s")
    run.profiles += [Profile(f"{name} (refresh copy)", raw, time.monotonic() - begin,
                             cpu[name]) for name, raw in files.items()]


def measure_first_writes(run: Run) -> str:
    """3. First writes to blocks of a refresh target against plain writes, interleaved."""
    admin, copy_size, block_size = run.admin, run.args.copy_size, run.block_size

    def writes(volume: str, volume_size: int) -> Sample:
        # One 4 KiB write at the start of each block of the upper half, in order: the
        # refresh copies from block 0 up and, rate-limited, does not get there.
        half = volume_size // 2
        return run_fio(run.uri(volume), run.volkin, f"--rw=write:{block_size - 4 * KiB}",
                       "--bs=4k", "--iodepth=1", f"--offset={half}", f"--size={half}",
                       run.runtime)

    plain: list[Sample] = []
    during: dict[bool, list[Sample]] = {False: [], True: []}  # with S2 -> samples
    for r in range(run.args.rounds):
        plain.append(writes("F", run.args.size))
        for with_s2 in (False, True):
            target = f"fw{r}{'s' if with_s2 else ''}"
            create_volume(admin, target, copy_size, avoid=run.v1_agent)
            names = [target]
            if with_s2:
                admin.CreateSnapshot(admin_pb2.CreateSnapshotRequest(source=target,
                                                                     name=f"{target}-S2"))
                names.insert(0, f"{target}-S2")
            job = admin.StartRefresh(admin_pb2.StartRefreshRequest(
                target=target, source="V1", rate_bytes_per_second=run.args.first_write_rate))
            sample = writes(target, copy_size)
            final = stop_job(admin, job.id)
            background = final.blocks_done - sample.result.write.bytes // (4 * KiB)
            if final.state == admin_pb2.JOB_STATE_DONE or \
                    background >= copy_size // block_size // 2:
                run.say(f"warning: the refresh of {target} reached the written half "
                        f"({final.blocks_done} blocks done): not every write was a first one")
            during[with_s2].append(sample)
            delete_volumes(admin, *names)
        run.say(f"first writes round {r + 1}: mean plain {ms(plain[-1].result.mean)}, during "
                f"a refresh {ms(during[False][-1].result.mean)}, with S2 "
                f"{ms(during[True][-1].result.mean)}")
    lines = ["| 4 KiB writes, qd1, one per block | mean | p50 | p99 | IOPS | ÷ plain (mean) "
             "| goal | met |", "|---|---|---|---|---|---|---|---|"]
    base = med([s.result.mean for s in plain])
    for label, runs in (("plain: the idle filled volume F", plain),
                        ("first writes to V2 during its refresh (no S2)", during[False]),
                        ("first writes to V2 during its refresh, S2 present", during[True])):
        mean = med([s.result.mean for s in runs])
        ratio, goal, met = "1", "—", "—"
        if runs is not plain:
            ratio, goal = f"**{mean / base:.2f}**", "≤ 2"
            met = "**yes**" if mean / base <= 2 else "no"
        lines.append(f"| {label} | {ms(mean)} | {ms(med([s.result.p50 for s in runs]))} | "
                     f"{ms(med([s.result.p99 for s in runs]))} | "
                     f"{med([s.result.iops for s in runs]):,.0f} | {ratio} | {goal} | {met} |")
    return (f"First write to a block during a refresh (V2 fresh and empty, refreshed from V1 at "
            f"{format_size(run.args.first_write_rate)}/s) vs a plain write; medians of "
            f"{run.args.rounds} interleaved rounds\n\n" + "\n".join(lines))


def measure_foreground(run: Run) -> str:
    """4. Foreground reads alone and beside back-to-back refreshes, interleaved."""
    options = ("--rw=randread", "--bs=4k", "--iodepth=1", f"--size={run.args.size}",
               run.runtime, "--time_based")
    idle: list[Sample] = []
    busy: list[Sample] = []
    shares: list[float] = []  # of fio's time, a refresh ran
    rates: list[float] = []  # MiB/s the refreshes copied
    for r in range(run.args.rounds):
        idle.append(run_fio(run.uri("F"), run.volkin, *options))
        refreshes = BackToBack(run.admin, "V1", run.args.copy_size, run.v1_agent, f"bg{r}")
        refreshes.start()
        refreshes.running.wait(60)
        begin = time.monotonic()
        try:
            busy.append(run_fio(run.uri("F"), run.volkin, *options))
            end = time.monotonic()
        finally:
            refreshes.stop()
        shares.append(refreshes.share_of(begin, end))
        rates.append(refreshes.copied / MiB / max(1e-9, sum(b - a for a, b in refreshes.spans)))
        run.say(f"foreground round {r + 1}: p99 idle {ms(idle[-1].result.p99)}, beside "
                f"refreshes {ms(busy[-1].result.p99)}; a refresh ran {shares[-1]:.0%} of the "
                f"time, copying {rates[-1]:.0f} MiB/s")
    lines = ["| 4 KiB random reads, qd1, on F | idle | beside refreshes | ÷ idle | goal | met |",
             "|---|---|---|---|---|---|"]
    for pick in ("p50", "p99"):
        quiet = med([getattr(s.result, pick) for s in idle])
        loud = med([getattr(s.result, pick) for s in busy])
        lines.append(f"| {pick} | {ms(quiet)} | {ms(loud)} | **{loud / quiet:.2f}** | ≤ 1.3 | "
                     f"{'**yes**' if loud / quiet <= 1.3 else 'no'} |")
    lines.append(f"| IOPS | {med([s.result.iops for s in idle]):,.0f} | "
                 f"{med([s.result.iops for s in busy]):,.0f} | | | |")
    return (f"Foreground latency during a refresh: refreshes of fresh volumes from V1 back to "
            f"back at `volkin refresh`'s default rate (unlimited), running {min(shares):.0%} to "
            f"{max(shares):.0%} of fio's time and copying {min(rates):.0f} to {max(rates):.0f} "
            f"MiB/s meanwhile; medians of {run.args.rounds} interleaved rounds\n\n"
            + "\n".join(lines))


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except VolkinError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _rate(text: str) -> int:
    try:
        return parse_rate(text)
    except VolkinError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of agent counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"agent counts must be at least 1: {text!r}")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=_size, default=GiB,
                        help="size of the fio volume F and its raw file (default 1GiB)")
    parser.add_argument("--copy-size", type=_size, default=GiB,
                        help="size of the refresh source V1 and its nbdcopy peer (default 1GiB)")
    parser.add_argument("--runtime", type=float, default=10.0, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per measure")
    parser.add_argument("--first-write-rate", type=_rate, default=16 * MiB,
                        help="rate limit of the refresh beside the first writes (default 16MiB)")
    parser.add_argument("--skip", action="append", choices=PARTS, default=[],
                        help="leave a part out (repeatable)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="py-spy the controller and an agent during one more run of the "
                             "first --job (default 4 KiB randwrite qd16)")
    parser.add_argument("--controller-arg", action="append", default=[], metavar="ARG",
                        help="pass ARG to the controller (repeatable), e.g. "
                             "--controller-arg=--busy-copy-blocks=20")
    parser.add_argument("--job", action="append", default=[], metavar="TEXT",
                        help="run only the fio jobs whose label contains TEXT (repeatable)")
    parser.add_argument("--agents", type=_counts, metavar="N[,N...]",
                        help="agents in the cluster (default 2); several, e.g. 1,2,3, start "
                             "one cluster of each size, F striped over all agents of each, "
                             "interleave the fio runs over them and end with a table that "
                             "sets them side by side")
    parser.add_argument("--tls", action="store_true",
                        help="mTLS on every channel (volkin's, and qemu-nbd with TLS and a "
                             "client certificate as its peer)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the cluster's directory (logs) afterwards")
    args = parser.parse_args()
    parts = [p for p in PARTS if p not in args.skip]
    counts = args.agents or [2]
    if min(counts) < 2 and set(parts) - {"fio"}:
        parser.error("with 1 agent only the fio part runs (the others place volumes on two "
                     "agents): add --skip copy --skip first-write --skip foreground")
    started = time.monotonic()
    print(f"machine: {machine()}\ncommit measured: {commit()}\n", flush=True)
    with contextlib.ExitStack() as stack:
        if args.tls:
            global TLS
            TLS = use_tls(Path(stack.enter_context(tempfile.TemporaryDirectory())))
            print("TLS: on every channel of volkin's, and qemu-nbd's and its clients' (one CA)",
                  flush=True)
        runs = [start_cluster(stack, args, count, started) for count in counts]
        for run in runs:
            prepare(run, parts)
        tables: list[list[str]] = [[] for _ in runs]
        if "fio" in parts:
            measure_fio(runs)
            for run, found in zip(runs, tables, strict=True):
                found.append(fio_table(run))
                if args.profile is not None:
                    profile_fio(run, profile_dir(args.profile, run, len(runs)))
        for run, found in zip(runs, tables, strict=True):
            if "copy" in parts:
                found.append(measure_copy(run))
                if args.profile is not None:
                    profile_copy(run, profile_dir(args.profile, run, len(runs)))
            if "first-write" in parts:
                found.append(measure_first_writes(run))
            if "foreground" in parts:
                found.append(measure_foreground(run))
        troubles = [log_trouble(run.work) for run in runs]
    for run, found, trouble in zip(runs, tables, troubles, strict=True):
        print(f"\nData path: {len(run.agent_pids)} agents, {run.block_size // KiB} KiB blocks; "
              f"the run took {time.monotonic() - started:.0f} s\n")
        print("\n\n".join(found))
        for recorded in run.profiles:
            print_profile(recorded)
        if trouble:
            print("\nIn the cluster's logs:\n" + "\n".join(trouble))
    if len(runs) > 1 and "fio" in parts:
        print("\n" + scaling_table(runs))


def start_cluster(stack: contextlib.ExitStack, args: argparse.Namespace, agents: int,
                  started: float) -> Run:
    """A fresh cluster of `agents` agents, stopped (with its peers) when `stack` closes."""
    cluster = stack.enter_context(Loopback(agents=agents, keep=args.keep,
                                           controller_args=args.controller_arg))
    controller = cluster.start()
    assert controller.process is not None
    agent_pids = {a.node_id: a.process.pid for a in cluster.agents if a.process}
    run = Run(args, cluster, controller.nbd, {"controller": [controller.process.pid],
                                              "agents": list(agent_pids.values())},
              agent_pids, started=started)
    stack.callback(run.stop_peers)
    run.say(f"cluster of {agents} agent(s) up in {cluster.work}")
    return run


def profile_dir(directory: Path, run: Run, clusters: int) -> Path:
    """Where a cluster's profiles go: DIR, or DIR/agents-N when there are several."""
    return directory if clusters == 1 else directory / f"agents-{len(run.agent_pids)}"


if __name__ == "__main__":
    main()
