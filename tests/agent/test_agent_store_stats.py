"""StatStore: what an agent tells `volkin status` about its node, on a real agent process."""

from __future__ import annotations

import os

import pytest

from tests.agent.conftest import AgentFactory, create
from volkin.api.v1 import agent_pb2

pytestmark = pytest.mark.integration
MiB = 1 << 20


def test_stat_store_reports_the_data_directorys_file_system_and_the_extents(
        start_agent: AgentFactory) -> None:
    a1 = start_agent("a1")
    empty = a1.stub.StatStore(agent_pb2.StatStoreRequest(), timeout=10)
    fs = os.statvfs(a1.data_dir)
    assert empty.capacity_bytes == fs.f_blocks * fs.f_frsize
    assert 0 < empty.used_bytes <= empty.capacity_bytes
    assert 0 < empty.available_bytes <= empty.capacity_bytes - empty.used_bytes
    assert empty.extents == 0

    create(a1, "e1", 4 * MiB), create(a1, "e2", 4 * MiB)
    two = a1.stub.StatStore(agent_pb2.StatStoreRequest(), timeout=10)
    assert two.extents == 2 and two.epoch >= 1
