"""Choosing how to attach, and the commands of both ways, on this machine (which has no
kernel NBD: the FUSE and loop way is the one that runs here, see test_node_fuse.py)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

from volkin.csi import attach
from volkin.csi.attach import Attachment


def test_the_kernel_way_connects_nbd_client_to_a_free_device_by_export_name(
        tmp_path: Path) -> None:
    assert attach.nbd_client_command("10.0.0.5:10809", "pvc-1", "/dev/nbd3") == [
        "nbd-client", "10.0.0.5", "10809", "/dev/nbd3", "-N", "pvc-1", "-b", "4096"]
    for n in (0, 1, 2, 10):
        (tmp_path / f"nbd{n}").mkdir()
    (tmp_path / "nbd0" / "pid").write_text("123")
    (tmp_path / "nbd1" / "pid").write_text("456")
    (tmp_path / "loop0").mkdir()
    assert attach.free_nbd_device(tmp_path) == "/dev/nbd2"


def test_the_fuse_way_exports_the_volume_over_nbd_as_a_writable_fuse_file(
        tmp_path: Path) -> None:
    argv = attach.qsd_command("127.0.0.1:10809", "pvc-1", tmp_path / "export",
                              tmp_path / "qsd.pid")
    assert argv[0] == "qemu-storage-daemon" and "--daemonize" in argv
    blockdev = argv[argv.index("--blockdev") + 1]
    assert "driver=nbd" in blockdev and "server.host=127.0.0.1" in blockdev
    assert "server.port=10809" in blockdev and "export=pvc-1" in blockdev
    export = argv[argv.index("--export") + 1]
    assert "type=fuse" in export and f"mountpoint={tmp_path / 'export'}" in export
    assert "writable=on" in export


def test_with_tls_both_ways_present_the_node_certificate_and_require_tls(
        tmp_path: Path) -> None:
    tls_dir = tmp_path / "nbd-tls"
    argv = attach.qsd_command("127.0.0.1:10809", "pvc-1", tmp_path / "export",
                              tmp_path / "qsd.pid", tls_dir)
    creds = argv[argv.index("--object") + 1]
    assert creds.startswith("tls-creds-x509,") and f"dir={tls_dir}" in creds
    assert "endpoint=client" in creds
    blockdev = argv[argv.index("--blockdev") + 1]
    assert f"tls-creds={creds.split('id=')[1].split(',')[0]}" in blockdev
    kernel = attach.nbd_client_command("10.0.0.5:10809", "pvc-1", "/dev/nbd3", tls_dir)
    assert kernel[kernel.index("-certfile") + 1] == str(tls_dir / "client-cert.pem")
    assert kernel[kernel.index("-keyfile") + 1] == str(tls_dir / "client-key.pem")
    assert kernel[kernel.index("-cacertfile") + 1] == str(tls_dir / "ca-cert.pem")
    assert kernel[kernel.index("-tlshostname") + 1] == "10.0.0.5"


def test_auto_picks_the_kernel_only_where_the_kernel_has_nbd() -> None:
    chosen = asyncio.run(attach.choose("auto", "127.0.0.1:10809"))
    kernel = asyncio.run(attach.kernel_has_nbd()) and shutil.which("nbd-client")
    expected = "kernel" if kernel else "fuse"
    assert chosen.method == expected
    assert asyncio.run(attach.choose("kernel", "h:1")).method == "kernel"
    assert asyncio.run(attach.choose("fuse", "h:1")).method == "fuse"


def test_an_attachment_survives_a_round_trip_through_its_record() -> None:
    made = Attachment("pvc-1", "fuse", "/dev/loop3", 4242, "/var/lib/volkin-csi/x/export")
    assert Attachment.from_json(json.loads(attach.dump(made))) == made


def test_detaching_what_is_gone_already_does_nothing(tmp_path: Path) -> None:
    gone = Attachment("pvc-1", "fuse", "/dev/loop999", 2 ** 22 + 1, str(tmp_path / "export"))
    asyncio.run(attach.FuseLoop("h:1").detach(gone))
    asyncio.run(attach.KernelNbd("h:1").detach(Attachment("pvc-1", "kernel", "/dev/nbd999")))
