"""Tables for people, JSON for scripts, progress lines: what the CLI prints."""

import io
import json

from volkin.api.v1 import admin_pb2
from volkin.cli import output
from volkin.cli.commands import Progress


def _volume() -> admin_pb2.Volume:
    return admin_pb2.Volume(name="S2", size_bytes=64 << 20, block_size=65536,
                            kind=admin_pb2.VOLUME_KIND_SNAPSHOT, source="V2", valid_blocks=256,
                            total_blocks=1024, agents=["agent1", "agent2"],
                            allocated_bytes=3 << 20, stripe_unit_bytes=4 << 20,
                            stripe_width=2)


def _job(state: admin_pb2.JobState.ValueType = admin_pb2.JOB_STATE_RUNNING, done: int = 512,
         error: str = "") -> admin_pb2.Job:
    return admin_pb2.Job(id="j1", kind=admin_pb2.JOB_KIND_REFRESH, state=state, target="V2",
                         source="V1", blocks_total=1024, blocks_done=done,
                         bytes_copied=done * 65536, rate_bytes_per_second=16 << 20, error=error)


def test_volume_json_has_every_field_with_enum_words_and_bytes() -> None:
    assert output.volume_dict(_volume()) == {
        "name": "S2", "kind": "snapshot", "size_bytes": 64 << 20, "block_size": 65536,
        "source": "V2", "valid_blocks": 256, "total_blocks": 1024,
        "agents": ["agent1", "agent2"], "stripe_unit_bytes": 4 << 20, "stripe_width": 2,
        "connections": 0, "allocated_bytes": 3 << 20}


def test_volume_show_says_what_the_volume_holds_on_disk() -> None:
    lines = output.volume_detail([output.volume_dict(_volume())]).splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "BLOCK", "SOURCE", "REAL", "ALLOCATED",
                                "STRIPES", "AGENTS"]
    assert lines[1].split() == ["S2", "snapshot", "64MiB", "64KiB", "V2", "25%", "3MiB",
                                "2x4MiB", "agent1,agent2"]


def test_job_json_keeps_default_values_instead_of_dropping_them() -> None:
    job = output.job_dict(admin_pb2.Job(id="j9"))
    assert job == {"id": "j9", "kind": "unspecified", "state": "unspecified", "target": "",
                   "source": "", "blocks_total": 0, "blocks_done": 0, "bytes_copied": 0,
                   "rate_bytes_per_second": 0, "error": "", "reason": "",
                   "waiting_seconds": 0.0}
    assert json.loads(output.to_json([job])) == [job]


def test_volume_table_aligns_columns_with_readable_sizes() -> None:
    plain = output.volume_dict(admin_pb2.Volume(
        name="a-long-volume-name", size_bytes=1 << 30, block_size=4096,
        kind=admin_pb2.VOLUME_KIND_PRIMARY, valid_blocks=0, total_blocks=0))
    lines = output.volume_table([output.volume_dict(_volume()), plain]).splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "BLOCK", "SOURCE", "REAL", "AGENTS"]
    assert lines[1].split() == ["S2", "snapshot", "64MiB", "64KiB", "V2", "25%",
                                "agent1,agent2"]
    assert lines[2].split() == ["a-long-volume-name", "primary", "1GiB", "4KiB", "-", "-", "-"]
    starts = {line.index(word) for line, word in zip(lines, ["KIND", "snapshot", "primary"],
                                                       strict=True)}
    assert len(starts) == 1, "the KIND column is aligned"
    assert all(line == line.rstrip() for line in lines)


def test_a_waiting_job_says_why_and_for_how_long_in_its_table_row_and_progress_line() -> None:
    waiting = output.job_dict(admin_pb2.Job(
        id="j3", kind=admin_pb2.JOB_KIND_REFRESH, state=admin_pb2.JOB_STATE_WAITING,
        target="V2", source="V1", blocks_total=8, blocks_done=2,
        reason="agent a2 (127.0.0.1:7001) could not copy: connection refused",
        waiting_seconds=12.4))
    row = output.job_table([waiting]).splitlines()[1]
    assert "waiting" in row.split()
    assert row.endswith("waiting 12s: agent a2 (127.0.0.1:7001) could not copy: connection refused")
    line = output.progress_line(waiting, None, 3.0)
    assert "  waiting 12s: agent a2" in line


def test_job_table_shows_progress_rate_and_error() -> None:
    failed = output.job_dict(_job(admin_pb2.JOB_STATE_FAILED, 3, "agent2 unreachable"))
    unlimited = output.job_dict(admin_pb2.Job(id="j2", kind=admin_pb2.JOB_KIND_REFRESH,
                                              state=admin_pb2.JOB_STATE_DONE))
    lines = output.job_table([failed, unlimited]).splitlines()
    assert "1024" in lines[1] and "3/1024 (0%)" in lines[1] and "16MiB/s" in lines[1]
    assert lines[1].endswith("agent2 unreachable")
    assert "unlimited" in lines[2] and "0/0 (-)" in lines[2]


def test_an_empty_listing_is_just_the_header() -> None:
    assert output.job_table([]).split() == ["ID", "KIND", "STATE", "TARGET", "SOURCE",
                                            "BLOCKS", "COPIED", "RATE", "ERROR/REASON"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    stream = _Terminal()
    progress = Progress(stream)
    for done in (0, 256, 512):
        progress.update(_job(done=done))
    progress.update(_job(admin_pb2.JOB_STATE_DONE, 1024), final=True)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.count("\r") == 4
    last = text.rsplit("\r", 1)[1]
    assert "done" in last and "1024/1024 blocks (100%)" in last and "64MiB copied" in last


def test_progress_elsewhere_is_plain_lines_at_state_changes_and_the_end() -> None:
    stream = io.StringIO()
    progress = Progress(stream)
    progress.update(_job(done=0))
    progress.update(_job(done=100))  # same state, too soon: not shown
    progress.update(_job(admin_pb2.JOB_STATE_PAUSED, 200))
    progress.update(_job(admin_pb2.JOB_STATE_DONE, 1024), final=True)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split()[5] for line in lines] == ["running", "paused", "done"]
    assert "100/1024" not in stream.getvalue()


def test_a_failed_job_shows_why_in_its_progress_line() -> None:
    line = output.progress_line(output.job_dict(_job(admin_pb2.JOB_STATE_FAILED, 7, "boom")),
                                None, 1.0)
    assert "failed" in line and line.endswith("error: boom") and "-/s" in line


def test_component_table_says_running_or_stopped_without_a_pid() -> None:
    etcd: dict[str, object] = {"name": "etcd", "pid": 41, "address": "127.0.0.1:2", "running": True,
                               "log": "/d/logs/etcd.log"}
    controller: dict[str, object] = {"name": "controller", "pid": None,
                                     "address": "127.0.0.1:3", "running": False,
                                     "log": "/d/logs/controller.log"}
    rows = [etcd, controller]
    lines = output.component_table(rows).splitlines()
    assert lines[0].split() == ["COMPONENT", "PID", "ADDRESS", "STATE", "LOG"]
    assert lines[1].split() == ["etcd", "41", "127.0.0.1:2", "running", "/d/logs/etcd.log"]
    assert lines[2].split() == ["controller", "-", "127.0.0.1:3", "stopped",
                                "/d/logs/controller.log"]
