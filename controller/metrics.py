"""The controller's Prometheus metrics, in their own registry, served over HTTP.

Two kinds, by what they cost:

- events, counted where they happen: NBD requests (`NbdMetrics`), map commits
  (`CommitMetrics`), etcd transactions (`EtcdMetrics`). Each is a few additions
  under prometheus_client's locks; the NBD server binds the children of each
  operation once, so a request looks no label up.
- state, read from the active term only when scraped (`controller.scrape`):
  per-volume map figures, jobs, leadership. Nothing on the I/O path.

Each group can be made without a registry (the default): its instruments then
count into nothing that is served, which is what tests and tools that build a
server or a map store of their own get.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from controller.nbd import protocol as p
from volkin.served import ServedRegistry

_LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# NBD commands by the name of their `op` label (NBD_CMD_DISC is never answered).
NBD_OPS: dict[int, str] = {
    p.Cmd.READ: "read", p.Cmd.WRITE: "write", p.Cmd.FLUSH: "flush", p.Cmd.TRIM: "trim",
    p.Cmd.CACHE: "cache", p.Cmd.WRITE_ZEROES: "write_zeroes", p.Cmd.BLOCK_STATUS: "block_status"}


class NbdMetrics:
    """Every NBD request answered (or left unanswered), by operation."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests = Counter(
            "volkin_controller_nbd_requests", "NBD requests by operation and result (ok, an "
            "errno name, or unanswered: the connection closed first)", ["op", "result"],
            registry=registry)
        self.bytes = Counter(
            "volkin_controller_nbd_bytes", "Bytes of the NBD requests answered ok, by operation "
            "(read: returned; write: received; the others: the length of their range)",
            ["op"], registry=registry)
        self.seconds = Histogram(
            "volkin_controller_nbd_request_seconds", "Time from an NBD request's arrival to its "
            "answer, waits for overlapping requests included, by operation", ["op"],
            buckets=_LATENCY_BUCKETS, registry=registry)
        self._ok = {cmd: self.requests.labels(op, "ok") for cmd, op in NBD_OPS.items()}
        self._bytes = {cmd: self.bytes.labels(op) for cmd, op in NBD_OPS.items()}
        self._seconds = {cmd: self.seconds.labels(op) for cmd, op in NBD_OPS.items()}

    def answered(self, command: int, error: int, length: int, started: float) -> None:
        """A request answered, `started` at that perf_counter() time; `length` its bytes."""
        seconds = self._seconds.get(command)
        if seconds is None:  # a command NBD does not define, refused
            self.requests.labels("other", p.Errno(error).name).inc()
            return
        seconds.observe(time.perf_counter() - started)
        if error:
            self.requests.labels(NBD_OPS[command], p.Errno(error).name).inc()
            return
        self._ok[command].inc()
        if length:
            self._bytes[command].inc(length)

    def unanswered(self, command: int) -> None:
        self.requests.labels(NBD_OPS.get(command, "other"), "unanswered").inc()


class CommitMetrics:
    """Map commits: each plan's bits, made durable in etcd batched with others'."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.commits = Counter(
            "volkin_controller_map_commits", "Map commits made durable in etcd (one per plan "
            "that changed bits, or per background run)", registry=registry)
        self.failed = Counter(
            "volkin_controller_map_commit_failures", "Map commits whose batch etcd did not "
            "take (their plans stopped)", registry=registry)
        self.batch = Histogram(
            "volkin_controller_map_commit_batch_size", "Commits carried by one group commit "
            "(the ones that queued while the previous batch was in flight)",
            buckets=_BATCH_BUCKETS, registry=registry)

    def committed(self, commits: int) -> None:
        self.batch.observe(commits)
        self.commits.inc(commits)


class EtcdMetrics:
    """The active controller's etcd transactions (every write it makes: `GuardedEtcd`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.seconds = Histogram(
            "volkin_controller_etcd_txn_seconds", "Time etcd took to answer one attempt of a "
            "guarded transaction", buckets=_LATENCY_BUCKETS, registry=registry)
        self.retries = Counter(
            "volkin_controller_etcd_txn_retries", "Attempts of a transaction that etcd did not "
            "answer (sent again unchanged)", registry=registry)


class ControllerMetrics(ServedRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.nbd = NbdMetrics(self.registry)
        self.commits = CommitMetrics(self.registry)
        self.etcd = EtcdMetrics(self.registry)
