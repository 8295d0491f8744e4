"""The VolumeRefresh CRD's schema, checked as an API server would check a resource
against it (JSON Schema validation, unknown fields refused as with strict field
validation), and against what the operator reads and writes. Its CEL rule (an
immutable spec) needs an API server and is not evaluated here."""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.render import KUSTOMIZE_DIR
from volkin.k8s.decision import Phase, Status
from volkin.k8s.resource import spec_from, status_to

CRD = yaml.safe_load((KUSTOMIZE_DIR / "base" / "volumerefresh-crd.yaml").read_text())
(VERSION,) = CRD["spec"]["versions"]
SCHEMA = VERSION["schema"]["openAPIV3Schema"]
EXAMPLES = [o for o in yaml.safe_load_all((KUSTOMIZE_DIR / "examples" /
                                           "volumerefresh.yaml").read_text()) if o]


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema refusing unknown fields, as `kubectl apply --validate=strict` does
    (by default an API server prunes them; either way they have no effect)."""
    schema = copy.deepcopy(schema)

    def walk(node: dict[str, Any]) -> None:
        if "properties" in node and node is not schema["properties"]["metadata"]:
            node.setdefault("additionalProperties", False)
            for child in node["properties"].values():
                walk(child)

    walk(schema)
    return schema


VALIDATOR = jsonschema.Draft4Validator(strict(SCHEMA))


def errors(resource: dict[str, Any]) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(resource)]


def test_the_schema_is_structural_every_field_has_a_type() -> None:
    def walk(node: dict[str, Any], path: str) -> None:
        assert "type" in node, path
        for name, child in node.get("properties", {}).items():
            walk(child, f"{path}.{name}")

    walk(SCHEMA, "")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e["metadata"]["name"])
def test_the_documented_examples_are_valid(example: dict[str, Any]) -> None:
    assert errors(example) == []
    spec = spec_from(example["spec"])
    assert spec.target_pvc and bool(spec.source_pvc) != bool(spec.source_snapshot)


def resource(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "volkin.io/v1alpha1", "kind": "VolumeRefresh",
            "metadata": {"name": "r"}, "spec": spec}


@pytest.mark.parametrize("why, spec", [
    ("both sources", {"targetPVC": "t", "source": {"persistentVolumeClaimName": "a",
                                                    "volumeSnapshotName": "b"}}),
    ("no source", {"targetPVC": "t", "source": {}}),
    ("source left out", {"targetPVC": "t"}),
    ("no target", {"source": {"persistentVolumeClaimName": "a"}}),
    ("empty target", {"targetPVC": "", "source": {"persistentVolumeClaimName": "a"}}),
    ("negative rate", {"targetPVC": "t", "source": {"volumeSnapshotName": "s"},
                       "rateBytesPerSecond": -1}),
    ("rate as text", {"targetPVC": "t", "source": {"volumeSnapshotName": "s"},
                      "rateBytesPerSecond": "10MiB"}),
    ("misspelt field", {"targetPvc": "t", "source": {"volumeSnapshotName": "s"}}),
])
def test_an_invalid_volume_refresh_is_rejected(why: str, spec: dict[str, Any]) -> None:
    assert errors(resource(**spec)), why


def test_an_unknown_phase_in_the_status_is_rejected() -> None:
    body = {**EXAMPLES[0], "status": {"phase": "Done"}}
    assert errors(body)


@pytest.mark.parametrize("phase", list(Phase))
def test_every_status_the_operator_writes_fits_the_schema(phase: Phase) -> None:
    status = Status(phase=phase, job_id="j8", started_after=7, blocks_done=3, blocks_total=4,
                    message="m", target_volume="t", source_volume="s")
    written = {k: v for k, v in status_to(status).items() if v is not None}
    assert errors({**EXAMPLES[0], "status": written}) == []


def test_the_printer_columns_point_at_fields_of_the_schema() -> None:
    for column in VERSION["additionalPrinterColumns"]:
        path = column["jsonPath"].lstrip(".").split(".")
        if path[0] == "metadata":
            continue
        node = SCHEMA
        for part in path:
            node = node["properties"][part]
        assert node["type"] == column["type"], column["name"]


def test_the_spec_cannot_change_after_creation() -> None:
    rules = SCHEMA["properties"]["spec"]["x-kubernetes-validations"]
    assert {"rule": "self == oldSelf"}.items() <= rules[0].items()
