"""A whole volkin cluster of real processes for one fault trial, supervised like systemd would.

One etcd (`tests.support.etcd.EtcdServer`), N agents (`python3 -m agent`) and M
controllers (`python3 -m controller`), all on free loopback ports, logs in the
trial's directory. The first controller is started alone so that it leads; the
others wait as standbys.

A supervisor thread plays systemd's `Restart=always`: any agent or controller
process that exits is started again after `RESTART_SEC`, unless a fault holds
it down (`hold`/`release`: the fault decides when "systemd" brings it back).
Agents come back on the port they had, as an operator's unit file would say.
etcd is not supervised: the faults that kill it restart it themselves.

Who leads is read from etcd (`Keys.controller_address`, under the leader's
lease), through etcd's JSON gateway so that no thread needs an event loop.
Every event (kill, restart, exit) goes to the trial's `Timeline`, which a
failure report prints.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import grpc

import volkin.tls
from tests.support.etcd import EtcdServer
from volkin.api.v1 import admin_pb2_grpc
from volkin.keys import Keys

REPO = Path(__file__).resolve().parents[2]
# The tree whose daemons run: this repository unless VOLKIN_FAULT_CODE names another
# checkout (e.g. an export of a commit, to compare before and after a fix).
CODE = Path(os.environ.get("VOLKIN_FAULT_CODE") or REPO)
# systemd's RestartSec for the supervised daemons.
RESTART_SEC = 0.3
KEYS = Keys()

T = TypeVar("T")


class Timeline:
    """What happened in a trial, with seconds since its start: the story of a failure."""

    def __init__(self) -> None:
        self.start = time.time()
        self._lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def note(self, text: str, at: float | None = None) -> None:
        with self._lock:
            self._lines.append(((at or time.time()) - self.start, text))

    def rel(self, at: float) -> str:
        return f"+{at - self.start:.2f}s"

    def render(self) -> str:
        with self._lock:
            lines = sorted(self._lines)
        return "\n".join(f"  +{t:7.2f}s  {text}" for t, text in lines)


@dataclass(frozen=True)
class Leader:
    """The active controller as etcd names it."""

    node_id: str
    admin: str
    nbd: str
    pid: int


@dataclass(frozen=True)
class Serving:
    """One `controller.serving` log line: a controller became the leader."""

    at: float  # wall clock (the log's timestamp, millisecond precision)
    node_id: str
    nbd: str
    pid: int
    epoch: int


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the thread that started it ends, so that
    no daemon outlives a test process that was killed."""
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Daemon:
    """One restartable process with its log file."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.held = False  # a fault keeps it down: the supervisor leaves it alone
        self.stopped = False  # SIGSTOPped by a fault
        self.starts = 0

    def argv(self) -> list[str]:
        raise NotImplementedError

    def spawn(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=CODE,
                env={**os.environ, "PYTHONPATH": str(CODE)}, preexec_fn=_die_with_parent)
        self.starts += 1

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def exit_code(self) -> int | None:
        """None while running (or never started)."""
        if self.process is None:
            return None
        return self.process.poll()

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)
        if sig is signal.SIGSTOP:
            self.stopped = True
        elif sig is signal.SIGCONT:
            self.stopped = False

    def kill(self) -> None:
        """kill -9 and reap."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
        self.stopped = False

    def log(self, since: int = 0) -> str:
        try:
            return self.log_path.read_text(errors="replace")[since:]
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0


class AgentDaemon(Daemon):
    def __init__(self, name: str, root: Path, etcd: EtcdServer, lease_ttl: int) -> None:
        super().__init__(name, root / f"{name}.log")
        self.data_dir = root / name
        self.etcd = etcd
        self.lease_ttl = lease_ttl
        self.port = 0  # picked by the OS at the first start, then kept
        self.address = ""

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "agent", "--node-id", self.name,
                "--data-dir", str(self.data_dir), "--listen", f"127.0.0.1:{self.port}",
                "--metrics-listen", "127.0.0.1:0", "--etcd-endpoints", self.etcd.endpoint,
                "--lease-ttl", str(self.lease_ttl), "--shutdown-grace", "1"]

    def wait_serving(self, since: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"event=agent\.serving .*?address=(\S+)", self.log(since))
            if found:
                self.address = found.group(1)
                self.port = int(self.address.rpartition(":")[2])
                return
            if self.exit_code() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"agent {self.name} did not start; log {self.log_path}:\n"
                           f"{self.log(since)[-3000:]}")


class ControllerDaemon(Daemon):
    def __init__(self, name: str, root: Path, etcd: EtcdServer, lease_ttl: int,
                 extra: list[str]) -> None:
        super().__init__(name, root / f"{name}.log")
        self.etcd = etcd
        self.lease_ttl = lease_ttl
        self.extra = extra

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "controller", "--node-id", self.name,
                "--etcd-endpoints", self.etcd.endpoint, "--listen", "127.0.0.1:0",
                "--nbd-listen", "127.0.0.1:0", "--lease-ttl", str(self.lease_ttl),
                "--shutdown-grace", "2", *self.extra]

    def servings(self) -> list[Serving]:
        found = []
        for line in self.log().splitlines():
            if "event=controller.serving" not in line:
                continue
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            try:
                at = datetime.strptime(fields["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
                    tzinfo=UTC).timestamp()
                found.append(Serving(at, fields.get("node", self.name), fields["nbd"],
                                     int(fields["pid"]), int(fields["epoch"])))
            except (KeyError, ValueError):
                continue
        return found


_flags_cache: dict[str, str] = {}


def controller_flags() -> str:
    """`python3 -m controller --help` of the code under test (flags come and go)."""
    key = str(CODE)
    if key not in _flags_cache:
        result = subprocess.run([sys.executable, "-m", "controller", "--help"], cwd=CODE,
                                env={**os.environ, "PYTHONPATH": str(CODE)},
                                capture_output=True, text=True, timeout=60, check=False)
        _flags_cache[key] = result.stdout
    return _flags_cache[key]


class Cluster:
    """etcd, agents and controllers for one trial; `close()` ends every process it started."""

    def __init__(self, root: Path, timeline: Timeline, *, agents: int = 3,
                 controllers: int = 2, lease_ttl: int = 3, io_wait: float = 20.0) -> None:
        self.root = root
        self.timeline = timeline
        self.lease_ttl = lease_ttl
        root.mkdir(parents=True, exist_ok=True)
        self.etcd = EtcdServer(root / "etcd")
        extra = []
        # Pass the new settings only to a controller that has them.
        if "--io-wait" in controller_flags():
            extra += ["--io-wait", str(io_wait)]
        if "--metrics-listen" in controller_flags():  # not its default port: trials run at once
            extra += ["--metrics-listen", "127.0.0.1:0"]
        self.agents = [AgentDaemon(f"a{i + 1}", root, self.etcd, lease_ttl)
                       for i in range(agents)]
        self.controllers = [ControllerDaemon(f"c{i + 1}", root, self.etcd, lease_ttl, extra)
                            for i in range(controllers)]
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    @property
    def daemons(self) -> list[Daemon]:
        return [*self.agents, *self.controllers]

    # -- life cycle ------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self.etcd.start()
        self.timeline.note(f"etcd serving at {self.etcd.endpoint} (pid {self.etcd_pid})")
        for agent in self.agents:
            agent.spawn()
        for agent in self.agents:
            agent.wait_serving(0, timeout)
            self.timeline.note(f"{agent.name} serving at {agent.address} (pid {agent.pid})")
        first, *standbys = self.controllers
        first.spawn()
        leader = self.wait_leader(timeout)
        self.timeline.note(f"{first.name} leads (pid {leader.pid}, nbd {leader.nbd})")
        for standby in standbys:
            standby.spawn()
        # A standby says so in its log; give it a moment to get there, so that it is
        # waiting before any fault (a controller that logs otherwise is waited for less).
        deadline = time.monotonic() + 10
        for standby in standbys:
            while "controller.standby" not in standby.log() and time.monotonic() < deadline:
                if standby.exit_code() is not None:
                    raise RuntimeError(f"standby {standby.name} exited:\n"
                                       f"{standby.log()[-3000:]}")
                time.sleep(0.05)
            self.timeline.note(f"{standby.name} is a standby (pid {standby.pid})")
        self._supervisor = threading.Thread(target=self._supervise, name="supervisor",
                                            daemon=True)
        self._supervisor.start()

    @property
    def etcd_pid(self) -> int:
        return self.etcd.process.pid if self.etcd.process is not None else 0

    def etcd_signal(self, sig: signal.Signals) -> None:
        if self.etcd.process is not None and self.etcd.process.poll() is None:
            os.kill(self.etcd.process.pid, sig)

    def _supervise(self) -> None:
        exited_at: dict[str, float] = {}
        while not self._stop.wait(0.05):
            for daemon in self.daemons:
                if daemon.held:
                    exited_at.pop(daemon.name, None)
                    continue
                code = daemon.exit_code()
                if code is None:
                    continue
                now = time.monotonic()
                if daemon.name not in exited_at:
                    exited_at[daemon.name] = now
                    self.timeline.note(f"{daemon.name} (pid {daemon.pid}) exited with code "
                                       f"{code}")
                elif now - exited_at[daemon.name] >= RESTART_SEC:
                    with self._lock:
                        if self._stop.is_set() or daemon.held:
                            continue
                        daemon.spawn()
                    del exited_at[daemon.name]
                    self.timeline.note(f"supervisor restarted {daemon.name} (pid {daemon.pid})")

    def hold(self, daemon: Daemon) -> None:
        """The supervisor leaves `daemon` alone until `release`."""
        with self._lock:
            daemon.held = True

    def release(self, daemon: Daemon) -> None:
        """Starts `daemon` now if it is not running, and supervises it again."""
        with self._lock:
            if daemon.exit_code() is not None and not self._stop.is_set():
                daemon.spawn()
                self.timeline.note(f"restarted {daemon.name} (pid {daemon.pid})")
            daemon.held = False

    def close(self) -> None:
        """Kills every process of the cluster (resuming any stopped one first)."""
        self._stop.set()
        if self._supervisor is not None:
            self._supervisor.join(5)
        with self._lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()
            for daemon in self.daemons:
                daemon.signal(signal.SIGCONT)
                daemon.kill()
            if self.etcd.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.etcd.process.pid, signal.SIGCONT)
            self.etcd.stop()

    # -- etcd ------------------------------------------------------------------------
    def etcd_get(self, key: str, timeout: float = 0.5) -> bytes | None:
        """The value at `key` through etcd's JSON gateway; raises OSError if etcd is away."""
        body = json.dumps({"key": base64.b64encode(key.encode()).decode()}).encode()
        tls = volkin.tls.current()
        request = urllib.request.Request(
            f"{volkin.tls.scheme()}://{self.etcd.endpoint}/v3/kv/range", body)
        with urllib.request.urlopen(request, timeout=timeout,
                                    context=tls.client_context() if tls else None) as response:
            kvs = json.load(response).get("kvs")
        return base64.b64decode(kvs[0]["value"]) if kvs else None

    def leader(self) -> Leader | None:
        """The active controller per etcd, or None (no leader, or etcd not answering)."""
        try:
            raw = self.etcd_get(KEYS.controller_address)
        except (OSError, ValueError):
            return None
        if raw is None:
            return None
        record = json.loads(raw)
        return Leader(str(record["node_id"]), str(record["admin"]), str(record["nbd"]),
                      int(record["pid"]))

    def wait_leader(self, timeout: float, other_than: int = 0) -> Leader:
        """Waits for a leader whose pid is not `other_than`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader()
            if leader is not None and leader.pid != other_than:
                return leader
            time.sleep(0.05)
        raise TimeoutError(f"no controller led within {timeout:.0f}s"
                           + (f" (other than pid {other_than})" if other_than else ""))

    def controller(self, pid: int) -> ControllerDaemon | None:
        return next((c for c in self.controllers if c.pid == pid), None)

    def servings(self) -> list[Serving]:
        return sorted((s for c in self.controllers for s in c.servings()), key=lambda s: s.at)

    # -- the admin API of whoever leads ----------------------------------------------
    def admin(self, call: Callable[[admin_pb2_grpc.AdminStub], T], timeout: float = 30.0,
              what: str = "admin call") -> T:
        """Runs `call` on the current leader's admin API, retrying while none answers.

        Only UNAVAILABLE and DEADLINE_EXCEEDED are retried; any other status is raised.
        """
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            leader = self.leader()
            if leader is not None:
                try:
                    return call(self._stub(leader.admin))
                except grpc.RpcError as exc:
                    code = exc.code() if isinstance(exc, grpc.Call) else None
                    if code not in (grpc.StatusCode.UNAVAILABLE,
                                    grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                    last = f"{code}: {exc.details() if isinstance(exc, grpc.Call) else exc}"
            else:
                last = "no leader in etcd"
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: no controller answered within {timeout:.0f}s "
                                   f"(last: {last})")
            time.sleep(0.2)

    def _stub(self, address: str) -> admin_pb2_grpc.AdminStub:
        with self._lock:
            channel = self._channels.get(address)
            if channel is None:
                channel = self._channels[address] = volkin.tls.channel(address)
        return admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]

    # -- reports ---------------------------------------------------------------------
    def log_excerpts(self, pattern: str = r"level=(warning|error)|event=controller\.|"
                     r"event=job\.|Traceback|Error", per_log: int = 25) -> str:
        """The interesting lines of every daemon's log, for a failure report."""
        out = []
        for daemon in self.daemons:
            lines = [line[:400] for line in daemon.log().splitlines() if re.search(pattern, line)]
            if lines:
                out.append(f"--- {daemon.log_path} ({len(lines)} matching lines, last "
                           f"{min(per_log, len(lines))})")
                out.extend(lines[-per_log:])
        return "\n".join(out)
