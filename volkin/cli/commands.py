"""What each admin command does: one function per command, protobuf in, words out.

Every function takes the parsed arguments and an open `Controller`, prints its result
on stdout, and returns the exit code. Failures are raised (client.CommandError) and
reported by `__main__`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from volkin.api.v1 import admin_pb2
from volkin.cli import output
from volkin.cli.client import CommandError, Controller

# Non-TTY progress: one line per this many seconds (and one per state change).
PLAIN_PROGRESS_EVERY = 2.0
# Exit codes besides 0, 1 (failed) and 2 (usage): `status` on an unhealthy cluster,
# `job wait --timeout` when the job has not ended in time.
UNHEALTHY = 3
TIMED_OUT = 4


def _show(args: argparse.Namespace, items: list[dict[str, Any]],
          render: Callable[[list[dict[str, Any]]], str], single: bool) -> None:
    if args.output == "json":
        print(output.to_json(items[0] if single else items))
    else:
        print(render(items))


def volume_create(args: argparse.Namespace, c: Controller) -> int:
    volume = c.call(f"create volume {args.name}", c.stub.CreateVolume,
                    admin_pb2.CreateVolumeRequest(name=args.name, size_bytes=args.size,
                                                  block_size=args.block_size,
                                                  stripe_unit_bytes=args.stripe_unit,
                                                  stripe_width=args.stripe_width))
    _show(args, [output.volume_dict(volume)], output.volume_table, single=True)
    return 0


def volume_list(args: argparse.Namespace, c: Controller) -> int:
    reply = c.call("list volumes", c.stub.ListVolumes, admin_pb2.ListVolumesRequest())
    _show(args, [output.volume_dict(v) for v in reply.volumes], output.volume_table,
          single=False)
    return 0


def volume_show(args: argparse.Namespace, c: Controller) -> int:
    volume = c.call(f"show volume {args.name}", c.stub.GetVolume,
                    admin_pb2.GetVolumeRequest(name=args.name))
    _show(args, [output.volume_dict(volume)], output.volume_detail, single=True)
    return 0


def volume_resize(args: argparse.Namespace, c: Controller) -> int:
    volume = c.call(f"resize volume {args.name}", c.stub.ResizeVolume,
                    admin_pb2.ResizeVolumeRequest(name=args.name, size_bytes=args.size))
    _show(args, [output.volume_dict(volume)], output.volume_table, single=True)
    return 0


def volume_delete(args: argparse.Namespace, c: Controller) -> int:
    c.call(f"delete volume {args.name}", c.stub.DeleteVolume,
           admin_pb2.DeleteVolumeRequest(name=args.name, force=args.force))
    if args.output == "json":  # scripts get an answer; people get silence, as with rm
        print(output.to_json({"name": args.name, "deleted": True}))
    return 0


def snapshot_create(args: argparse.Namespace, c: Controller) -> int:
    volume = c.call(f"snapshot {args.source} as {args.name}", c.stub.CreateSnapshot,
                    admin_pb2.CreateSnapshotRequest(source=args.source, name=args.name))
    _show(args, [output.volume_dict(volume)], output.volume_table, single=True)
    return 0


def refresh(args: argparse.Namespace, c: Controller) -> int:
    job = c.call(f"refresh {args.target} from {args.source}", c.stub.StartRefresh,
                 admin_pb2.StartRefreshRequest(target=args.target, source=args.source,
                                               rate_bytes_per_second=args.rate))
    return _started(args, c, job)


def snapshot_materialize(args: argparse.Namespace, c: Controller) -> int:
    job = c.call(f"materialize {args.name}", c.stub.StartMaterialize,
                 admin_pb2.StartMaterializeRequest(name=args.name,
                                                   rate_bytes_per_second=args.rate))
    return _started(args, c, job)


def _started(args: argparse.Namespace, c: Controller, job: admin_pb2.Job) -> int:
    """Prints a new job's id (or the job, with -o json); with --wait, follows it."""
    if not args.wait:
        print(output.to_json(output.job_dict(job)) if args.output == "json" else job.id)
        return 0
    if args.output != "json":
        print(job.id, flush=True)
    final = wait_for(c, job.id, sys.stderr)
    if args.output == "json":
        print(output.to_json(output.job_dict(final)))
    return _job_outcome(final)


def job_list(args: argparse.Namespace, c: Controller) -> int:
    reply = c.call("list jobs", c.stub.ListJobs, admin_pb2.ListJobsRequest())
    _show(args, [output.job_dict(j) for j in reply.jobs], output.job_table, single=False)
    return 0


def job_show(args: argparse.Namespace, c: Controller) -> int:
    job = c.call(f"show job {args.id}", c.stub.GetJob, admin_pb2.GetJobRequest(id=args.id))
    _show(args, [output.job_dict(job)], output.job_table, single=True)
    return 0


def job_pause(args: argparse.Namespace, c: Controller) -> int:
    job = c.call(f"pause job {args.id}", c.stub.PauseJob, admin_pb2.PauseJobRequest(id=args.id))
    _show(args, [output.job_dict(job)], output.job_table, single=True)
    return 0


def job_resume(args: argparse.Namespace, c: Controller) -> int:
    job = c.call(f"resume job {args.id}", c.stub.ResumeJob,
                 admin_pb2.ResumeJobRequest(id=args.id))
    _show(args, [output.job_dict(job)], output.job_table, single=True)
    return 0


def job_cancel(args: argparse.Namespace, c: Controller) -> int:
    job = c.call(f"cancel job {args.id}", c.stub.CancelJob,
                 admin_pb2.CancelJobRequest(id=args.id))
    _show(args, [output.job_dict(job)], output.job_table, single=True)
    return 0


def job_set_rate(args: argparse.Namespace, c: Controller) -> int:
    job = c.call(f"set the rate of job {args.id}", c.stub.SetJobRate,
                 admin_pb2.SetJobRateRequest(id=args.id, rate_bytes_per_second=args.rate))
    _show(args, [output.job_dict(job)], output.job_table, single=True)
    return 0


def job_wait(args: argparse.Namespace, c: Controller) -> int:
    # GetJob first, so an unknown id is NOT_FOUND at once with the usual message.
    c.call(f"wait for job {args.id}", c.stub.GetJob, admin_pb2.GetJobRequest(id=args.id))
    final = wait_for(c, args.id, sys.stderr, args.timeout)
    if final.state not in _FINISHED:
        done = output.job_dict(final)
        raise CommandError(f"job {args.id} is still {done['state']} after {args.timeout:g} s "
                           f"({final.blocks_done}/{final.blocks_total} blocks); it goes on: "
                           f"wait again, or `volkin job cancel {args.id}`", TIMED_OUT)
    _show(args, [output.job_dict(final)], output.job_table, single=True)
    return _job_outcome(final)


def status(args: argparse.Namespace, c: Controller) -> int:
    reply = c.call("ask for the cluster's status", c.stub.GetClusterStatus,
                   admin_pb2.GetClusterStatusRequest())
    shown = output.status_dict(reply)
    print(output.to_json(shown) if args.output == "json" else output.status_text(shown))
    if not reply.healthy:
        raise CommandError("cluster unhealthy: " + "; ".join(reply.problems), UNHEALTHY)
    return 0


def agent_list(args: argparse.Namespace, c: Controller) -> int:
    reply = c.call("list agents", c.stub.ListAgents, admin_pb2.ListAgentsRequest())
    _show(args, [output.agent_dict(a) for a in reply.agents], output.agent_table,
          single=False)
    return 0


_FINISHED = (admin_pb2.JOB_STATE_DONE, admin_pb2.JOB_STATE_FAILED,
             admin_pb2.JOB_STATE_CANCELLED)


def _job_outcome(job: admin_pb2.Job) -> int:
    if job.state == admin_pb2.JOB_STATE_FAILED:
        raise CommandError(f"job {job.id} failed: {job.error or 'no reason given'}")
    if job.state == admin_pb2.JOB_STATE_CANCELLED:
        raise CommandError(f"job {job.id} was cancelled: {job.target} still reads the blocks "
                           f"not copied through {job.source} (`volkin job resume {job.id}` "
                           f"finishes the copy)")
    return 0


class Progress:
    """Shows a job's updates on `stream`: one line rewritten in place on a terminal,
    otherwise a plain line every PLAIN_PROGRESS_EVERY seconds and at each state change."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.monotonic()
        self._first: tuple[float, int] | None = None
        self._last_line = 0.0
        self._last_state = -1
        self._width = 0

    def update(self, job: admin_pb2.Job, final: bool = False) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = (now, job.bytes_copied)
        t0, b0 = self._first
        speed = (job.bytes_copied - b0) / (now - t0) if now - t0 > 0.2 else None
        line = output.progress_line(output.job_dict(job), speed, now - self.start)
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self._width = len(line)
        elif final or job.state != self._last_state or now - self._last_line >= \
                PLAIN_PROGRESS_EVERY:
            self.stream.write(line + "\n")
            self._last_line = now
        self._last_state = job.state
        self.stream.flush()


def wait_for(c: Controller, job_id: str, stream: TextIO,
             timeout: float | None = None) -> admin_pb2.Job:
    """Follows the job until it is done, failed or cancelled, showing progress; returns its
    last state — which has not ended if `timeout` seconds passed first."""
    progress = Progress(stream)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        last: admin_pb2.Job | None = None
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            current: admin_pb2.Job = c.call(f"wait for job {job_id}", c.stub.GetJob,
                                            admin_pb2.GetJobRequest(id=job_id))
            progress.update(current, final=True)
            return current
        for job in c.watch_job(job_id, left):
            last = job
            if job.state in _FINISHED:
                progress.update(job, final=True)
                return job
            progress.update(job)
        # The stream ended early (the controller restarted?): ask, then follow again.
        now: admin_pb2.Job = c.call(f"wait for job {job_id}", c.stub.GetJob,
                                    admin_pb2.GetJobRequest(id=job_id))
        if now.state in _FINISHED:
            progress.update(now, final=True)
            return now
        if last is None:
            time.sleep(0.5)


COMMANDS: dict[str, Callable[[argparse.Namespace, Controller], int]] = {
    "volume.create": volume_create,
    "volume.list": volume_list,
    "volume.show": volume_show,
    "volume.resize": volume_resize,
    "volume.delete": volume_delete,
    "snapshot.create": snapshot_create,
    "snapshot.materialize": snapshot_materialize,
    "refresh": refresh,
    "job.list": job_list,
    "job.show": job_show,
    "job.wait": job_wait,
    "job.pause": job_pause,
    "job.resume": job_resume,
    "job.cancel": job_cancel,
    "job.set-rate": job_set_rate,
    "status": status,
    "agent.list": agent_list,
}
