"""How the CLI shows things: tables for people, JSON for programs, progress lines.

The JSON forms are a contract for scripts: snake_case keys, sizes in bytes, enum
values as lower-case words (`primary`, `running`), every field always present.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from volkin.api.v1 import admin_pb2
from volkin.cli.sizes import format_size

Row = Mapping[str, Any]


def _enum_word(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def volume_dict(volume: admin_pb2.Volume) -> dict[str, Any]:
    return {
        "name": volume.name,
        "kind": _enum_word(admin_pb2.VolumeKind.Name(volume.kind), "VOLUME_KIND_"),
        "size_bytes": volume.size_bytes,
        "block_size": volume.block_size,
        "source": volume.source,
        "valid_blocks": volume.valid_blocks,
        "total_blocks": volume.total_blocks,
        "agents": list(volume.agents),
        "stripe_unit_bytes": volume.stripe_unit_bytes,
        "stripe_width": volume.stripe_width,
        "connections": volume.connections,
        "allocated_bytes": volume.allocated_bytes,
    }


def job_dict(job: admin_pb2.Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "kind": _enum_word(admin_pb2.JobKind.Name(job.kind), "JOB_KIND_"),
        "state": _enum_word(admin_pb2.JobState.Name(job.state), "JOB_STATE_"),
        "target": job.target,
        "source": job.source,
        "blocks_total": job.blocks_total,
        "blocks_done": job.blocks_done,
        "bytes_copied": job.bytes_copied,
        "rate_bytes_per_second": job.rate_bytes_per_second,
        "error": job.error,
        "reason": job.reason,
        "waiting_seconds": job.waiting_seconds,
    }


def agent_dict(agent: admin_pb2.Agent) -> dict[str, Any]:
    return {
        "node_id": agent.node_id,
        "address": agent.address,
        "data_address": agent.data_address,
        "registered": agent.registered,
        "alive": agent.alive,
        "error": agent.error,
        "capacity_bytes": agent.capacity_bytes,
        "used_bytes": agent.used_bytes,
        "available_bytes": agent.available_bytes,
        "extents": agent.extents,
        "epoch": agent.epoch,
    }


def status_dict(status: admin_pb2.ClusterStatus) -> dict[str, Any]:
    c, e, j = status.controller, status.etcd, status.jobs
    return {
        "healthy": status.healthy,
        "problems": list(status.problems),
        "controller": {"leader": c.leader, "admin_address": c.leader_admin_address,
                       "nbd_address": c.leader_nbd_address, "epoch": c.epoch,
                       "answered_by": c.answered_by,
                       "answered_by_leader": c.answered_by_leader},
        "etcd": {"healthy": e.healthy, "error": e.error, "db_size_bytes": e.db_size_bytes,
                 "db_size_in_use_bytes": e.db_size_in_use_bytes,
                 "db_quota_bytes": e.db_quota_bytes, "revision": e.revision,
                 "alarms": list(e.alarms)},
        "jobs": {"running": j.running, "waiting": j.waiting, "paused": j.paused,
                 "failed": j.failed, "cancelled": j.cancelled, "done": j.done},
        "agents": [agent_dict(a) for a in status.agents],
    }


def to_json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=False)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; no trailing blanks."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _percent(done: int, total: int) -> str:
    return f"{100 * done // total}%" if total else "-"


def volume_table(volumes: Sequence[Row]) -> str:
    rows = [[v["name"], v["kind"], format_size(v["size_bytes"]), format_size(v["block_size"]),
             v["source"] or "-", _percent(v["valid_blocks"], v["total_blocks"]),
             ",".join(v["agents"]) or "-"] for v in volumes]
    return table(["NAME", "KIND", "SIZE", "BLOCK", "SOURCE", "REAL", "AGENTS"], rows)


def volume_detail(volumes: Sequence[Row]) -> str:
    """`volume show`: the table's columns, what the volume holds on disk and its stripes
    (width x unit, `3x1MiB`; `-` for a volume not placed yet)."""
    rows = [[v["name"], v["kind"], format_size(v["size_bytes"]), format_size(v["block_size"]),
             v["source"] or "-", _percent(v["valid_blocks"], v["total_blocks"]),
             format_size(v["allocated_bytes"]),
             f"{v['stripe_width']}x{format_size(v['stripe_unit_bytes'])}"
             if v["stripe_width"] else "-",
             ",".join(v["agents"]) or "-"] for v in volumes]
    return table(["NAME", "KIND", "SIZE", "BLOCK", "SOURCE", "REAL", "ALLOCATED", "STRIPES",
                  "AGENTS"], rows)


def _blocks(job: Row) -> str:
    done, total = job["blocks_done"], job["blocks_total"]
    return f"{done}/{total} ({_percent(done, total)})"


def job_table(jobs: Sequence[Row]) -> str:
    rows = [[j["id"], j["kind"], j["state"], j["target"], j["source"] or "-", _blocks(j),
             format_size(j["bytes_copied"]),
             format_size(j["rate_bytes_per_second"]) + "/s" if j["rate_bytes_per_second"]
             else "unlimited",
             _why(j)] for j in jobs]
    return table(["ID", "KIND", "STATE", "TARGET", "SOURCE", "BLOCKS", "COPIED", "RATE",
                  "ERROR/REASON"], rows)


def _why(job: Row) -> str:
    """Why a job failed, or why (and for how long) it waits."""
    if job["error"]:
        return str(job["error"])
    if job["reason"]:
        return f"waiting {job['waiting_seconds']:.0f}s: {job['reason']}"
    return "-"


def progress_line(job: Row, speed: float | None, elapsed: float) -> str:
    """One line that says where a job is: `j1 refresh V2 <- V1  running  512/1024 blocks …`.
    `speed` is bytes per second as seen by the watcher, None before it could tell."""
    done, total = job["blocks_done"], job["blocks_total"]
    shown = "-" if speed is None else format_size(int(speed))
    line = (f"{job['id']} {job['kind']} {job['target']} <- {job['source']}  {job['state']}  "
            f"{done}/{total} blocks ({_percent(done, total)})  "
            f"{format_size(job['bytes_copied'])} copied  {shown}/s  {elapsed:.1f}s")
    if job["error"]:
        line += f"  error: {job['error']}"
    elif job["reason"]:
        line += f"  waiting {job['waiting_seconds']:.0f}s: {job['reason']}"
    return line


def _space(agent: Row, key: str) -> str:
    return format_size(agent[key]) if agent["alive"] else "-"


def agent_table(agents: Sequence[Row]) -> str:
    """`volkin agent list`: each agent, whether it answers, and its data file system."""
    rows = [[a["node_id"], a["address"] or "-", a["data_address"] or "-",
             "yes" if a["alive"] else "NO", _space(a, "capacity_bytes"),
             _space(a, "used_bytes"), _space(a, "available_bytes"),
             str(a["extents"]) if a["alive"] else "-", a["error"] or "-"] for a in agents]
    return table(["AGENT", "ADDRESS", "DATA", "ALIVE", "CAPACITY", "USED", "AVAILABLE",
                  "EXTENTS", "ERROR"], rows)


def status_text(status: Row) -> str:
    """`volkin status`: the controller, etcd, the jobs, then the agents; the verdict last."""
    c, e, j = status["controller"], status["etcd"], status["jobs"]
    if c["leader"]:
        role = "leader" if c["answered_by_leader"] else "standby"
        leader = (f"{c['leader']} leads, epoch {c['epoch']}, admin {c['admin_address'] or '-'}"
                  f", nbd {c['nbd_address'] or '-'} (answered by {c['answered_by']}, "
                  f"{role})")
    elif not e["healthy"]:
        role = "leader" if c["answered_by_leader"] else "standby"
        leader = f"unknown: etcd cannot be read (answered by {c['answered_by']}, {role})"
    else:
        leader = f"none leads (answered by {c['answered_by']}, standby)"
    if e["healthy"]:
        quota = f", quota {format_size(e['db_quota_bytes'])}" if e["db_quota_bytes"] else ""
        in_use = e["db_size_in_use_bytes"]
        etcd = (f"healthy, database {format_size(e['db_size_bytes'])}"
                f"{f' ({format_size(in_use)} in use)' if in_use else ''}{quota}, "
                f"revision {e['revision']}")
    else:
        etcd = f"UNHEALTHY: {e['error']}"
    jobs = ", ".join(f"{n} {k}" for k, n in j.items())
    alive = sum(1 for a in status["agents"] if a["alive"])
    lines = [f"controller  {leader}", f"etcd        {etcd}", f"jobs        {jobs}",
             f"agents      {alive} of {len(status['agents'])} alive", "",
             agent_table(status["agents"]), ""]
    if status["healthy"]:
        lines.append("health      ok")
    else:
        lines += [f"health      UNHEALTHY: {p}" for p in status["problems"]]
    return "\n".join(lines)


def component_table(components: Sequence[Row]) -> str:
    """The dev cluster's processes, for `volkin dev status`."""
    rows = [[c["name"], str(c["pid"] or "-"), c["address"],
             "running" if c["running"] else "stopped", c["log"]] for c in components]
    return table(["COMPONENT", "PID", "ADDRESS", "STATE", "LOG"], rows)
