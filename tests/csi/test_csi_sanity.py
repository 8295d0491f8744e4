"""csi-sanity, the Kubernetes CSI conformance suite, passes against volkin-csi on a dev
cluster, with mount and with block volumes; whatever it skips is a capability volkin does
not advertise."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.cli.conftest import REPO
from tests.csi.conftest import Driver, can_attach_here
from volkin.api.csi.v1 import csi_pb2

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SANITY = REPO.parent / "shared" / "bin" / "csi-sanity"
Ctl = csi_pb2.ControllerServiceCapability.RPC
NodeCap = csi_pb2.NodeServiceCapability.RPC
Plugin = csi_pb2.PluginCapability.Service

# What csi-sanity says when it skips a spec, and the capability whose absence makes it.
SKIPPED_FOR: dict[str, tuple[str, int | None]] = {
    "ControllerPublishVolume not supported": ("controller", Ctl.PUBLISH_UNPUBLISH_VOLUME),
    "ControllerUnpublishVolume not supported": ("controller", Ctl.PUBLISH_UNPUBLISH_VOLUME),
    "Controller Publish, UnpublishVolume not supported":
        ("controller", Ctl.PUBLISH_UNPUBLISH_VOLUME),
    "ControllerExpandVolume not supported": ("controller", Ctl.EXPAND_VOLUME),
    "NodeExpandVolume not supported": ("node", NodeCap.EXPAND_VOLUME),
    "GetCapacity not supported": ("controller", Ctl.GET_CAPACITY),
    # Capabilities so new that proto/csi/v1 does not even declare them.
    "GetSnapshot not supported": ("controller", None),
    "Modify volume not supported": ("controller", None),
    "Modify Volume not supported": ("controller", None),
    "ControllerModifyVolume not supported": ("controller", None),
    "GroupControllerService not supported": ("plugin", Plugin.GROUP_CONTROLLER_SERVICE),
    "Service does not have single node multi writer capability":
        ("node", NodeCap.SINGLE_NODE_MULTI_WRITER),
}


def advertised(driver: Driver) -> dict[str, set[int]]:
    controller = driver.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest())
    node = driver.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest())
    plugin = driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
    return {"controller": {c.rpc.type for c in controller.capabilities},
            "node": {c.rpc.type for c in node.capabilities},
            "plugin": {c.service.type for c in plugin.capabilities}}


def run_sanity(driver: Driver, work: Path, access_type: str) -> tuple[ET.Element, str]:
    report = work / f"junit-{access_type}.xml"
    argv = [str(SANITY), f"--csi.endpoint=unix://{driver.socket}",
            f"--csi.mountdir={work / 'target'}", f"--csi.stagingdir={work / 'staging'}",
            "--csi.testvolumesize=16777216", "--ginkgo.no-color",
            f"--ginkgo.junit-report={report}"]
    if access_type == "block":
        argv.append("--csi.testvolumeaccesstype=block")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"csi-sanity failed:\n{output[-6000:]}\n{driver.log()[-3000:]}"
    return ET.parse(report).getroot(), output


@pytest.mark.parametrize("access_type", ["mount", "block"])
def test_csi_sanity_passes_and_skips_only_what_volkin_does_not_advertise(
        driver: Driver, tmp_path: Path, access_type: str) -> None:
    if not SANITY.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SANITY} is missing (shared/bin/README.md)")
        pytest.skip(f"{SANITY} is missing")
    reason = can_attach_here()
    if reason:
        pytest.skip(reason)
    caps = advertised(driver)
    assert {Ctl.CREATE_DELETE_VOLUME, Ctl.LIST_VOLUMES, Ctl.GET_VOLUME, Ctl.CLONE_VOLUME,
            Ctl.CREATE_DELETE_SNAPSHOT, Ctl.LIST_SNAPSHOTS, Ctl.EXPAND_VOLUME
            } <= caps["controller"]
    assert {NodeCap.STAGE_UNSTAGE_VOLUME, NodeCap.GET_VOLUME_STATS,
            NodeCap.EXPAND_VOLUME} <= caps["node"]

    report, output = run_sanity(driver, tmp_path, access_type)

    passed, skipped = [], []
    for case in report.iter("testcase"):
        status, name = case.get("status"), case.get("name", "")
        assert status in ("passed", "skipped", "pending"), f"{name}: {status}"
        if status == "passed":
            passed.append(name)
        elif status == "skipped":
            skip = case.find("skipped")
            message = (skip.get("message", "") if skip is not None else "")
            message = message.removeprefix("skipped - ").strip()
            assert message in SKIPPED_FOR, f"skipped for an unknown reason: {name}: {message}"
            service, capability = SKIPPED_FOR[message]
            if capability is not None:
                assert capability not in caps[service], f"{name} skipped, yet volkin claims it"
            skipped.append(name)
    # The specs of everything volkin claims ran: volumes, snapshots, clones, lists, node,
    # expansion (controller and node).
    ran = " ".join(passed)
    for claim in ("CreateVolume", "DeleteVolume", "ListVolumes", "ValidateVolumeCapabilities",
                  "CreateSnapshot", "DeleteSnapshot", "ListSnapshots", "NodeStageVolume",
                  "NodeGetVolumeStats", "should work", "from an existing source snapshot",
                  "from an existing source volume", "node-expand is called after node-publish",
                  "should fail when volume is not found"):
        assert claim in ran, f"no passed spec mentions {claim!r}"
    assert " 0 Failed" in output
    print(f"csi-sanity {access_type}: {len(passed)} passed, {len(skipped)} skipped")
