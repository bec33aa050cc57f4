"""The CRDs in crds/ are generated from the API models: fresh, structural, described, and pinned by a golden file.

Regenerate after a model change with ``python -m charlora.api.crd crds/`` and, when the change is intended,
``CHARLORA_UPDATE_GOLDEN=1 pytest tests/test_crd_generation.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from charlora.api.crd import GENERATED, characterlora_crd, render

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "characterlora.schema.json"


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = characterlora_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_crds_folder_is_fresh(name: str) -> None:
    on_disk = (ROOT / "crds" / name).read_text()
    assert on_disk == render(GENERATED[name]()), f"crds/{name} is stale: run python -m charlora.api.crd crds/"


def test_schema_matches_golden() -> None:
    schema = _schema()
    if os.environ.get("CHARLORA_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    assert schema == json.loads(GOLDEN.read_text()), "schema changed: review, then CHARLORA_UPDATE_GOLDEN=1"


def test_schema_is_structural_and_never_defaults() -> None:
    for path, node in _walk(_schema()):
        assert not {"$ref", "$defs", "anyOf", "oneOf"} & node.keys(), path
        assert "default" not in node, f"{path}: defaults would make the apiserver rewrite stored objects"
        if not path.endswith(".properties"):  # a property may be named "title"; a schema may not carry one
            assert "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        if "properties" in node and isinstance(node["properties"], dict) and path.endswith(("spec", "status")):
            assert node.get("type") == "object", path


def test_every_spec_and_status_field_is_described() -> None:
    spec_and_status = {k: _schema()["properties"][k] for k in ("spec", "status")}
    missing = []
    for path, node in _walk(spec_and_status):
        for name, field in (node.get("properties") or {}).items() if isinstance(node.get("properties"), dict) else []:
            if isinstance(field, dict) and not field.get("description") and not path.endswith("conditions.items"):
                missing.append(f"{path}.{name}")
    assert missing == [], f"fields without a description (kubectl explain shows nothing): {missing}"


def test_optional_fields_are_nullable_and_quantities_int_or_string() -> None:
    resources = _schema()["properties"]["spec"]["properties"]["resources"]["properties"]
    assert resources["cpu"]["x-kubernetes-int-or-string"] is True
    assert "type" not in resources["cpu"]
    assert resources["queueName"]["nullable"] is True
    assert resources["gpus"].get("nullable") is None
    training = _schema()["properties"]["spec"]["properties"]["training"]["properties"]
    assert training["unetLearningRate"]["type"] == "string"  # learning rates are never floats


def test_printer_columns_and_status_subresource() -> None:
    version = yaml.safe_load(render(characterlora_crd()).split("\n", 1)[1])["spec"]["versions"][0]
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Base",
        "Latest",
        "Serving",
        "Progress",
        "Ready",
        "Age",
    ]
    assert version["subresources"] == {"status": {}}
