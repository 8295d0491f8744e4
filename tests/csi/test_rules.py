"""The pure parts of the driver: names, list tokens, capacity, capabilities, configuration."""

from __future__ import annotations

import pytest

from tests.csi.conftest import block_capability, mount_capability
from volkin.api.csi.v1 import csi_pb2
from volkin.csi import config, names, requests
from volkin.errors import Aborted, InvalidArgument, OutOfRange

Mode = csi_pb2.VolumeCapability.AccessMode


def test_a_name_volkin_takes_is_kept_and_any_other_maps_to_one_stable_valid_name() -> None:
    assert names.volkin_name("pvc-0b7d3c2e-1f0a-4a4e-9a3e-2f6c1f0d9e11") == \
        "pvc-0b7d3c2e-1f0a-4a4e-9a3e-2f6c1f0d9e11"
    for odd in ("with space", "ü", "a/b", "x" * 129, "tab\there"):
        mapped = names.volkin_name(odd)
        assert names.is_volkin_name(mapped) and mapped == names.volkin_name(odd)
    assert names.volkin_name("a/b") != names.volkin_name("a b")


def test_pages_continue_after_the_last_name_handed_out_even_if_it_was_deleted() -> None:
    items = ["a", "b", "c", "d", "e"]
    first, token = names.page(items, items, "", 2)
    assert (first, bool(token)) == (["a", "b"], True)
    remaining = [i for i in items if i != "b"]  # "b" deleted between pages
    second, token = names.page(remaining, remaining, token, 2)
    assert second == ["c", "d"]
    third, token = names.page(items, items, token, 2)
    assert (third, token) == (["e"], "")
    assert names.page(items, items, "", 0) == (items, "")


@pytest.mark.parametrize("token", ["nonsense", "after.zz", "after.ff"])
def test_a_token_this_driver_did_not_hand_out_is_aborted(token: str) -> None:
    with pytest.raises(Aborted):
        names.page(["a"], ["a"], token, 1)


def test_capacity_rounds_up_to_whole_blocks_and_never_past_the_limit() -> None:
    block = 64 << 10
    assert requests.Capacity(100_000, 0).size(block) == 131_072
    assert requests.Capacity(0, 0).size(block) == requests.DEFAULT_SIZE
    assert requests.Capacity(0, 200_000).size(block) == 196_608
    assert requests.Capacity(131_072, 131_072).size(block) == 131_072
    with pytest.raises(OutOfRange):
        requests.Capacity(100_000, 120_000).size(block)
    with pytest.raises(InvalidArgument):
        requests.Capacity.of(csi_pb2.CapacityRange(required_bytes=10, limit_bytes=5))
    with pytest.raises(InvalidArgument):
        requests.Capacity.of(csi_pb2.CapacityRange(required_bytes=-1))


def test_single_node_modes_block_and_ext4_or_xfs_mounts_are_served() -> None:
    for mode in (Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
                 Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER):
        assert requests.capability_problem(block_capability(mode)) == ""
    for fs in ("", "ext4", "xfs"):
        assert requests.capability_problem(mount_capability(fs)) == ""
    assert "MULTI_NODE_MULTI_WRITER" in requests.capability_problem(
        mount_capability(mode=Mode.MULTI_NODE_MULTI_WRITER))
    assert "btrfs" in requests.capability_problem(mount_capability("btrfs"))
    assert "access type" in requests.capability_problem(csi_pb2.VolumeCapability(
        access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER)))
    with pytest.raises(InvalidArgument):
        requests.check_capabilities([])


def test_block_size_comes_from_the_storage_class_or_the_default() -> None:
    assert requests.block_size({}, 65536) == 65536
    assert requests.block_size({"blockSize": "4096"}, 65536) == 4096
    assert requests.block_size({"csi.storage.k8s.io/pvc/name": "x"}, 65536) == 65536
    for bad in ({"blockSize": "4k"}, {"blockSize": "1000"}, {"replicas": "3"}):
        with pytest.raises(InvalidArgument):
            requests.block_size(bad, 65536)


def test_flags_come_from_the_command_line_then_the_environment() -> None:
    settings = config.load(["--endpoint", "unix:///run/csi/csi.sock", "--mode", "controller"],
                           {"VOLKIN_CSI_CONTROLLER": "ctl:7470", "VOLKIN_CSI_NODE_ID": "n7",
                            "VOLKIN_CSI_MODE": "node"})
    assert (settings.controller, settings.node_id, settings.mode) == ("ctl:7470", "n7",
                                                                     "controller")
    assert config.socket_path(settings.endpoint) == "/run/csi/csi.sock"


@pytest.mark.parametrize("argv, says", [
    (["--controller", "c:1", "--nbd", "c:2"], "endpoint is required"),
    (["--endpoint", "unix:///s", "--nbd", "c:2"], "controller is required"),
    (["--endpoint", "tcp://0:1", "--controller", "c:1", "--nbd", "c:2"], "unix://"),
    (["--endpoint", "unix:///s", "--controller", "c:1"], "nbd is required"),
    (["--endpoint", "unix:///s", "--controller", "c:1", "--nbd", "c:2", "--mode", "both"],
     "mode"),
    (["--endpoint", "unix:///s", "--controller", "c:1", "--nbd", "c:2", "--attach", "iscsi"],
     "attach"),
])
def test_a_bad_setting_is_named(argv: list[str], says: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        config.load(argv, {})
    assert says in refused.value.message
