"""deploy/kubernetes rendered without kubectl: the subset of kustomize it uses.

The kustomizations use `resources` (files and directories with their own
kustomization), `namespace`, `labels` (metadata only) and `images`; this applies exactly
those, so that the manifests are validated on a machine
without kubectl. Where kubectl is installed, a test checks that both render the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZE_DIR = REPO / "deploy" / "kubernetes"
HANDLED = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
# Cluster-scoped kinds kustomize knows as such (built-in ones; not VolumeSnapshotClass).
KUSTOMIZE_CLUSTER_SCOPED = {"Namespace", "CSIDriver", "StorageClass", "ClusterRole",
                            "ClusterRoleBinding", "CustomResourceDefinition",
                            "PersistentVolume"}
CLUSTER_SCOPED = KUSTOMIZE_CLUSTER_SCOPED | {"VolumeSnapshotClass"}


def kustomization(directory: Path = KUSTOMIZE_DIR) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return loaded


def render(directory: Path = KUSTOMIZE_DIR) -> list[dict[str, Any]]:
    spec = kustomization(directory)
    unknown = set(spec) - HANDLED
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml uses {sorted(unknown)}, which "
                         f"render.py does not")
    objects: list[dict[str, Any]] = []
    for name in spec["resources"]:
        path = directory / name
        if path.is_dir():
            objects += render(path)
        else:
            objects += [o for o in yaml.safe_load_all(path.read_text()) if o]
    namespace = spec.get("namespace")
    labels: dict[str, str] = {}
    for group in spec.get("labels", []):
        labels.update(group["pairs"])
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}"
              for i in spec.get("images", [])}
    for obj in objects:
        meta = obj.setdefault("metadata", {})
        # kustomize gives every kind it does not know as cluster-scoped the namespace
        if namespace and obj["kind"] not in KUSTOMIZE_CLUSTER_SCOPED:
            meta["namespace"] = namespace
        if labels:
            meta["labels"] = {**meta.get("labels", {}), **labels}
        for subject in obj.get("subjects", []):
            if subject.get("kind") == "ServiceAccount" and namespace:
                subject["namespace"] = namespace
        for container in containers(obj):
            container["image"] = images.get(container["image"], container["image"])
    return objects


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
        spec: dict[str, Any] = obj["spec"]["template"]["spec"]
        return spec
    return None


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]] if spec else []
