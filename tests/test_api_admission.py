"""The real apiserver refuses bad CharacterLoRA manifests with a message naming the field, and so does the model."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from charlora.api.characterlora import CharacterLoRA, CharacterLoRASpec

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
GROUP, VERSION, PLURAL = "charlora.dev", "v1alpha1", "characterloras"

VALID_SPEC: dict[str, Any] = {
    "baseModel": {"family": "sdxl", "uri": "s3://models/sdxl/", "version": "sdxl-base-1.0"},
    "dataset": {"uri": "s3://datasets/anna/"},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    """VALID_SPEC with one field (dotted camelCase path) set to ``value``, or removed when value is ...."""
    spec = copy.deepcopy(VALID_SPEC)
    *parents, leaf = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        node.pop(leaf)
    else:
        node[leaf] = value
    return spec


PLACEHOLDER_MESSAGE = "still holds the <tune> placeholder"
POSITIVE = "must be a positive number written as a string"

# (case id, spec, fragments the apiserver's message must contain)
REFUSALS: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
    ("missing-base-version", _with("baseModel.version", ...), ("spec.baseModel.version", "Required value")),
    ("empty-base-version", _with("baseModel.version", ""), ("spec.baseModel.version",)),
    ("missing-dataset", _with("dataset", ...), ("spec.dataset", "Required value")),
    ("rank-zero", _with("training.rank", 0), ("spec.training.rank", "greater than or equal to 1")),
    ("rank-huge", _with("training.rank", 4096), ("spec.training.rank", "less than or equal to 512")),
    ("alpha-zero", _with("training.alpha", 0), ("spec.training.alpha", "greater than or equal to 1")),
    ("alpha-huge", _with("training.alpha", 5000), ("spec.training.alpha", "less than or equal to 1024")),
    ("lr-negative", _with("training.unetLearningRate", "-1e-4"), ("spec.training.unetLearningRate", POSITIVE)),
    ("lr-zero", _with("training.unetLearningRate", "0.0"), ("spec.training.unetLearningRate", POSITIVE)),
    ("lr-word", _with("training.unetLearningRate", "fast"), ("spec.training.unetLearningRate", POSITIVE)),
    ("lr-float", _with("training.unetLearningRate", 0.0001), ("spec.training.unetLearningRate", "string")),
    ("te-lr-zero", _with("training.textEncoderLearningRate", "0"), ("spec.training.textEncoderLearningRate", POSITIVE)),
    (
        "epochs-and-steps",
        _with("training", {"epochs": 10, "maxSteps": 1000}),
        ("spec.training", "set either epochs or maxSteps, not both"),
    ),
    ("family-unknown", _with("baseModel.family", "sd3"), ("spec.baseModel.family", "Unsupported value")),
    ("optimizer-unknown", _with("training.optimizer", "Lion"), ("spec.training.optimizer", "Unsupported value")),
    ("scheduler-unknown", _with("training.scheduler", "polynomial"), ("spec.training.scheduler", "Unsupported value")),
    ("precision-unknown", _with("training.mixedPrecision", "fp8"), ("spec.training.mixedPrecision", "Unsupported")),
    (
        "dataset-gs",
        _with("dataset.uri", "gs://bucket/anna/"),
        ("spec.dataset.uri", "must start with s3:// or file:///"),
    ),
    ("dataset-https", _with("dataset.uri", "https://example.com/anna.zip"), ("spec.dataset.uri", "s3://")),
    ("dataset-relative", _with("dataset.uri", "datasets/anna"), ("spec.dataset.uri", "s3://")),
    ("placeholder-base-uri", _with("baseModel.uri", "<tune>"), ("spec.baseModel.uri", PLACEHOLDER_MESSAGE)),
    ("placeholder-dataset", _with("dataset.uri", "s3://data/<tune>/"), ("spec.dataset.uri", PLACEHOLDER_MESSAGE)),
    ("placeholder-noise", _with("training.noiseOffset", "<tune>"), ("spec.training.noiseOffset", PLACEHOLDER_MESSAGE)),
    (
        "placeholder-prompt",
        _with("training.samplePrompts", ["a woman, <tune>"]),
        ("spec.training.samplePrompts[0]", PLACEHOLDER_MESSAGE),
    ),
    ("placeholder-lr", _with("training.unetLearningRate", "<tune>"), ("spec.training.unetLearningRate", "<tune>")),
    ("pin-latest", _with("serving.version", "latest"), ("spec.serving.version", "must be a version name like v1")),
    ("pin-v0", _with("serving.version", "v0"), ("spec.serving.version", "must be a version name like v1")),
    ("epoch-without-version", _with("serving.epoch", 3), ("spec.serving", "epoch needs version")),
    ("resolution-odd", _with("training.resolution", 500), ("spec.training.resolution", "multiple of 8")),
    ("deletion-unknown", _with("retention.deletionPolicy", "Purge"), ("spec.retention.deletionPolicy", "Unsupported")),
    ("keep-zero", _with("retention.keepVersions", 0), ("spec.retention.keepVersions", "greater than or equal to 1")),
    ("grid-cfg-zero", _with("training.gridCfgScales", ["0"]), ("spec.training.gridCfgScales[0]", POSITIVE)),
    (
        "buckets-inverted",
        _with("training.buckets", {"minResolution": 1024, "maxResolution": 512}),
        ("spec.training.buckets", "minResolution must not exceed maxResolution"),
    ),
    ("gpus-negative", _with("resources.gpus", -1), ("spec.resources.gpus", "greater than or equal to 0")),
]


def _manifest(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "CharacterLoRA", "metadata": {"name": name}, "spec": spec}


def test_there_are_at_least_twenty_refusals() -> None:
    assert len(REFUSALS) >= 20
    assert len({case for case, _, _ in REFUSALS}) == len(REFUSALS)


def test_apiserver_refuses_bad_specs_naming_the_field(
    kube: k8s.ApiClient, crds_installed: list[str], namespace: str
) -> None:
    custom = k8s.CustomObjectsApi(kube)
    accepted, unclear = [], []
    for case, spec, fragments in REFUSALS:
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _manifest(case, spec))
        except ApiException as err:
            message = json.loads(err.body)["message"]
            if err.status != 422 or not all(fragment in message for fragment in fragments):
                unclear.append(f"{case}: {err.status} {message}")
        else:
            accepted.append(case)
    assert accepted == [], f"the apiserver accepted bad manifests: {accepted}"
    assert unclear == [], "refusals without the expected message:\n" + "\n".join(unclear)
    assert custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"] == []


@pytest.mark.parametrize(("case", "spec"), [(case, spec) for case, spec, _ in REFUSALS])
def test_the_model_refuses_what_the_apiserver_refuses(case: str, spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        CharacterLoRASpec.model_validate(spec)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.stem)
def test_examples_are_accepted_and_stored_unchanged(
    example: Path, kube: k8s.ApiClient, crds_installed: list[str], namespace: str
) -> None:
    manifest = yaml.safe_load(example.read_text())
    CharacterLoRA.model_validate(manifest)
    custom = k8s.CustomObjectsApi(kube)
    created = custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    # No defaulting and no pruning: what the user wrote is what is stored.
    assert created["spec"] == manifest["spec"]


def test_examples_exist() -> None:
    assert len(EXAMPLES) >= 3
