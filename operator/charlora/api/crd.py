"""Generates the CRD YAML in ``crds/`` from the pydantic API models (the models are the source of truth).

The pydantic JSON schema becomes a Kubernetes structural schema: ``$defs`` inlined, ``Optional`` as ``nullable``,
int-or-string marked, no ``title``s, no ``default``s (defaults live in the models, so the apiserver never rewrites a
stored object), ``additionalProperties: false`` dropped (the apiserver prunes unknown fields). Every free-text
string gets the ``<tune>`` placeholder guard as a CEL rule.

Run ``python -m charlora.api.crd crds/`` to regenerate; a test fails when ``crds/`` is stale.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from charlora.api import characterlora
from charlora.api.base import GROUP, PLACEHOLDER, VERSION

PLACEHOLDER_RULE = {
    "rule": f"!self.contains('{PLACEHOLDER}')",
    "message": f"still holds the {PLACEHOLDER} placeholder from a template: replace it with a real value",
}


def structural_schema(model: type[BaseModel], *, user_input: bool = True) -> dict[str, Any]:
    """The model's validation schema, rewritten into a Kubernetes structural schema.

    ``user_input=False`` (status, written only by the operator) drops the CEL rules: they guard what people write,
    and their cost over unbounded status lists would exceed the apiserver's CEL budget.
    """
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.pop("$defs", {})
    schema = _convert(raw, definitions)
    return schema if user_input else _without_cel(schema)


def _without_cel(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _without_cel(value) for key, value in node.items() if key != "x-kubernetes-validations"}
    if isinstance(node, list):
        return [_without_cel(item) for item in node]
    return node


def _convert(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = definitions[node.pop("$ref").rsplit("/", 1)[-1]]
        return _convert({**target, **node}, definitions)  # the field's own description wins over the docstring
    if "anyOf" not in node:
        return _clean(node, definitions)
    options = node.pop("anyOf")
    present = [option for option in options if option.get("type") != "null"]
    if node.get("x-kubernetes-int-or-string") or {option.get("type") for option in present} == {"integer", "string"}:
        node["x-kubernetes-int-or-string"] = True
        result = _clean(node, definitions)
    elif len(present) == 1:
        result = _convert({**present[0], **node}, definitions)
    else:
        raise ValueError(f"Cannot express anyOf {options} in a structural schema")
    if len(present) < len(options):
        result["nullable"] = True
    return result


def _clean(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    for key in ("title", "default", "examples"):
        node.pop(key, None)
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]
    if "properties" in node:
        node["properties"] = {name: _convert(sub, definitions) for name, sub in node["properties"].items()}
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _convert(node["additionalProperties"], definitions)
    if "items" in node:
        node["items"] = _convert(node["items"], definitions)
    if node.get("type") == "string" and "enum" not in node and "format" not in node:
        node["x-kubernetes-validations"] = [dict(PLACEHOLDER_RULE), *node.get("x-kubernetes-validations", [])]
    return node


def build_crd(
    *,
    kind: str,
    plural: str,
    short_names: tuple[str, ...],
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    description: str,
    printer_columns: list[dict[str, Any]],
) -> dict[str, Any]:
    """A complete apiextensions.k8s.io/v1 CRD for one namespaced kind with a status subresource."""
    spec_schema = structural_schema(spec_model)
    status_schema = structural_schema(status_model, user_input=False)
    spec_schema.pop("nullable", None)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": list(short_names),
                "categories": ["charlora"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string", "description": "charlora.dev/v1alpha1"},
                                "kind": {"type": "string", "description": kind},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def characterlora_crd() -> dict[str, Any]:
    return build_crd(
        kind=characterlora.KIND,
        plural=characterlora.PLURAL,
        short_names=characterlora.SHORT_NAMES,
        spec_model=characterlora.CharacterLoRASpec,
        status_model=characterlora.CharacterLoRAStatus,
        description=(characterlora.CharacterLoRA.__doc__ or "").strip(),
        printer_columns=[
            {"name": "Base", "type": "string", "jsonPath": ".spec.baseModel.version"},
            {"name": "Latest", "type": "string", "jsonPath": ".status.latestVersion"},
            {"name": "Serving", "type": "string", "jsonPath": ".status.servedVersion"},
            {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent"},
            {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


GENERATED: dict[str, Callable[[], dict[str, Any]]] = {"characterlora.yaml": characterlora_crd}
HEADER = "# Generated by `python -m charlora.api.crd crds/` from operator/charlora/api. Do not edit.\n"


def render(crd: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(crd, sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the generated CRDs into a folder.")
    parser.add_argument("folder", type=Path, nargs="?", default=Path("crds"))
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    for name, build in GENERATED.items():
        (args.folder / name).write_text(render(build()))
        print(f"wrote {args.folder / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
