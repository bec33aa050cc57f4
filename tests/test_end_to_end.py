"""End to end: a CharacterLoRA becomes a trained, recorded version with the real operator and the real trainer.

The control plane, the Job controller, the scheduler, MinIO, the operator and the trainer are all real; kwok stands
in for the node, and a local process stands in for the container runtime: it runs the trainer's entry point with the
environment the operator's pod spec gives it (charlora.devtools.kubelet), and the pod ends with its exit code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from charlora.devtools.datasets import upload_tree, write_kohya_dataset
from charlora.devtools.kubelet import run_job_locally
from charlora.devtools.operating import OperatorProcess
from charlora.devtools.processes import wait_for
from charlora.devtools.tiny_models import build_tiny_pipeline, tiny_character

pytestmark = pytest.mark.workloads


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline("sd15", tmp_path_factory.mktemp("e2e") / "tiny-sd15", seed=0)


def _version(kube: k8s.ApiClient, ns: str, name: str) -> Callable[[], dict[str, Any] | None]:
    def read() -> dict[str, Any] | None:
        obj: Any = k8s.CustomObjectsApi(kube).get_namespaced_custom_object(
            "charlora.dev", "v1alpha1", ns, "characterloras", name
        )
        versions = (obj.get("status") or {}).get("versions") or []
        return versions[0] if versions and versions[0]["state"] in ("Succeeded", "Failed") else None

    return read


def test_a_character_is_trained_and_recorded(
    operator: OperatorProcess,
    kube: k8s.ApiClient,
    s3: Any,
    artifacts_bucket: str,
    ns: str,
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    dataset = upload_tree(
        s3, artifacts_bucket, write_kohya_dataset(tmp_path / "anna", folders={"2_anna": 6}), f"datasets/{ns}/anna"
    )
    k8s.CustomObjectsApi(kube).create_namespaced_custom_object(
        "charlora.dev", "v1alpha1", ns, "characterloras", tiny_character("anna", base=tiny_base, dataset=dataset)
    )

    run = run_job_locally(operator.control_plane, k8s.CoreV1Api(kube), ns, "anna-v1", workdir=tmp_path / "pod")
    assert run.exit_code == 0, run.stderr
    v1 = wait_for(_version(kube, ns, "anna"), timeout=60, what="v1 to finish")
    assert v1["state"] == "Succeeded", v1
    prefix = f"loras/{ns}/anna/v1/"
    lora = s3.get_object(Bucket=artifacts_bucket, Key=prefix + "lora.safetensors")["Body"].read()
    assert v1["sha256"] == hashlib.sha256(lora).hexdigest()
    assert v1["size"] == len(lora)
    assert v1["epochs"] == [1, 2]
    assert (v1["baseModelUri"], v1["baseModelVersion"]) == (str(tiny_base), "tiny-sd15")
    assert s3.head_object(Bucket=artifacts_bucket, Key=prefix + "grid.png")["ContentLength"] > 0
    obj: Any = k8s.CustomObjectsApi(kube).get_namespaced_custom_object(
        "charlora.dev", "v1alpha1", ns, "characterloras", "anna"
    )
    assert obj["status"]["servedVersion"] == "v1"
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def test_a_bad_dataset_is_refused_with_the_trainers_message(
    operator: OperatorProcess,
    kube: k8s.ApiClient,
    s3: Any,
    artifacts_bucket: str,
    ns: str,
    tiny_base: Path,
    tmp_path: Path,
) -> None:
    root = write_kohya_dataset(tmp_path / "bob", folders={"2_bob": 6})
    (root / "2_bob" / "img003.txt").unlink()
    dataset = upload_tree(s3, artifacts_bucket, root, f"datasets/{ns}/bob")
    k8s.CustomObjectsApi(kube).create_namespaced_custom_object(
        "charlora.dev", "v1alpha1", ns, "characterloras", tiny_character("bob", base=tiny_base, dataset=dataset)
    )

    run = run_job_locally(operator.control_plane, k8s.CoreV1Api(kube), ns, "bob-v1", workdir=tmp_path / "pod")
    assert run.exit_code == 3
    v1 = wait_for(_version(kube, ns, "bob"), timeout=60, what="v1 to finish")
    assert v1["state"] == "Failed"
    assert v1["badInput"] is True
    assert "2_bob/img003.png" in v1["reason"]
    pods = k8s.CoreV1Api(kube).list_namespaced_pod(ns, label_selector="job-name=bob-v1").items
    assert len(pods) == 1, "bad input is not retried"
