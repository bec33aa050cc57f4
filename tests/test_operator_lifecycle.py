"""The operator's training lifecycle against the real apiserver, kube-controller-manager, kwok and MinIO.

The trainer's side of the contract (progress.json, artifacts, manifest.json, the container's exit code) is played
by the test: it writes the objects to MinIO and ends the kwok pod with the exit code the trainer would return.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from charlora.api.characterlora import CharacterLoRA
from charlora.building import build_training_job
from charlora.config import OperatorConfig
from charlora.devtools.controlplane import ControlPlane
from charlora.devtools.kubelet import wait_for_running_pod
from charlora.devtools.operating import OperatorProcess
from charlora.devtools.standin import version_uri, write_artifacts, write_progress
from tests.world import wait_for

pytestmark = pytest.mark.workloads
GROUP, VERSION, PLURAL = "charlora.dev", "v1alpha1", "characterloras"


def _manifest(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CharacterLoRA",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"family": "sdxl", "uri": "s3://models/sdxl/", "version": "sdxl-base-1.0"},
            "dataset": {"uri": "s3://datasets/anna/"},
            **spec,
        },
    }


def _get(kube: k8s.ApiClient, ns: str, name: str) -> dict[str, Any]:
    obj: Any = k8s.CustomObjectsApi(kube).get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    return dict(obj)


def _status(kube: k8s.ApiClient, ns: str, name: str) -> dict[str, Any]:
    return _get(kube, ns, name).get("status") or {}


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def _version(kube: k8s.ApiClient, ns: str, name: str, version: str) -> dict[str, Any]:
    return next((v for v in _status(kube, ns, name).get("versions") or [] if v["name"] == version), {})


def _jobs(kube: k8s.ApiClient, ns: str) -> list[str]:
    return sorted(str(j.metadata.name) for j in k8s.BatchV1Api(kube).list_namespaced_job(ns).items)


def _patch_spec(kube: k8s.ApiClient, ns: str, name: str, spec: dict[str, Any]) -> None:
    k8s.CustomObjectsApi(kube).patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, {"spec": spec})


def _train_successfully(
    kube: k8s.ApiClient, s3: Any, workloads: ControlPlane, bucket: str, ns: str, name: str, version: str
) -> str:
    """Plays a successful trainer run of ``version``; returns the LoRA's sha256."""
    job = f"{name}-{version}"
    pod = wait_for_running_pod(k8s.CoreV1Api(kube), ns, job)
    _, prefix = version_uri(bucket, ns, name, version)
    sha = write_artifacts(s3, bucket, prefix, namespace=ns, name=name, version=version)
    workloads.finish_pod(ns, pod, exit_code=0)
    wait_for(
        lambda: _version(kube, ns, name, version).get("state") == "Succeeded",
        timeout=60,
        what=f"{version} to be recorded as succeeded",
    )
    return sha


def test_new_object_becomes_v1_with_progress_and_a_recorded_success(
    operator: OperatorProcess, kube: k8s.ApiClient, workloads: ControlPlane, s3: Any, artifacts_bucket: str, ns: str
) -> None:
    custom = k8s.CustomObjectsApi(kube)
    created = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _manifest("anna"))

    job = wait_for(
        lambda: next(iter(k8s.BatchV1Api(kube).list_namespaced_job(ns).items), None),
        timeout=30,
        what="the training Job",
    )
    assert job.metadata.name == "anna-v1"
    assert [(r.kind, r.name, r.uid, r.controller) for r in job.metadata.owner_references] == [
        ("CharacterLoRA", "anna", created["metadata"]["uid"], True)
    ]
    assert job.spec.template.spec.containers[0].resources.limits == {"nvidia.com/gpu": "1"}

    pod = wait_for_running_pod(k8s.CoreV1Api(kube), ns, "anna-v1")
    status = wait_for(lambda: (s := _status(kube, ns, "anna")).get("versions") and s, timeout=30, what="status")
    assert [(v["name"], v["jobName"]) for v in status["versions"]] == [("v1", "anna-v1")]
    assert _condition(status, "Ready")["status"] == "False"

    _, prefix = version_uri(artifacts_bucket, ns, "anna", "v1")
    write_progress(s3, artifacts_bucket, prefix, step=40, total=100, epoch=4, loss=0.1234)
    progress = wait_for(
        lambda: (
            (_status(kube, ns, "anna").get("progress") or {}).get("step") == 40
            and _status(kube, ns, "anna")["progress"]
        ),
        timeout=30,
        what="progress in status",
    )
    assert (progress["percent"], progress["totalSteps"], progress["epoch"], progress["loss"]) == (40, 100, 4, "0.1234")
    assert progress["eta"] == "0m30s"
    assert _condition(_status(kube, ns, "anna"), "Trained")["reason"] == "Training"

    sha = write_artifacts(s3, artifacts_bucket, prefix, namespace=ns, name="anna", version="v1")
    workloads.finish_pod(ns, pod, exit_code=0)
    wait_for(lambda: _version(kube, ns, "anna", "v1").get("state") == "Succeeded", timeout=60, what="v1 succeeded")
    status = _status(kube, ns, "anna")
    v1 = status["versions"][0]
    assert v1["sha256"] == sha
    assert v1["size"] == 32_000
    assert v1["artifactUri"] == f"s3://{artifacts_bucket}/{prefix}"
    assert v1["gridUri"] == f"s3://{artifacts_bucket}/{prefix}grid.png"
    assert (v1["baseModelVersion"], v1["epochs"]) == ("sdxl-base-1.0", [2, 4])
    assert (status["latestVersion"], status["servedVersion"]) == ("v1", "v1")
    assert "progress" not in status
    for kind in ("DatasetValid", "Trained", "Serving", "Ready"):
        assert _condition(status, kind)["status"] == "True", (kind, status["conditions"])
        assert _condition(status, kind)["observedGeneration"] == 1
    assert status["observedGeneration"] == 1

    events = k8s.CoreV1Api(kube).list_namespaced_event(ns, field_selector="involvedObject.name=anna").items
    reasons = {e.reason for e in events}
    assert {"Created", "Succeeded"} <= reasons, reasons
    assert operator.metric("charlora_versions_created_total") >= 1
    assert operator.metric("charlora_training_runs_total") >= 1


def test_succeeded_job_without_manifest_is_a_failed_version(
    operator: OperatorProcess, kube: k8s.ApiClient, workloads: ControlPlane, ns: str
) -> None:
    k8s.CustomObjectsApi(kube).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _manifest("bob"))
    workloads.finish_pod(ns, wait_for_running_pod(k8s.CoreV1Api(kube), ns, "bob-v1"), exit_code=0)
    v1 = wait_for(
        lambda: (v := _version(kube, ns, "bob", "v1")).get("state") == "Failed" and v, timeout=60, what="v1 failed"
    )
    assert "wrote no manifest.json" in v1["reason"]
    status = _status(kube, ns, "bob")
    assert _condition(status, "Trained")["reason"] == "TrainingFailed"
    assert _condition(status, "Ready")["status"] == "False"
    assert "latestVersion" not in status


def test_bad_dataset_fails_at_once_with_the_trainers_message(
    operator: OperatorProcess, kube: k8s.ApiClient, workloads: ControlPlane, ns: str
) -> None:
    k8s.CustomObjectsApi(kube).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _manifest("carl"))
    message = "dataset: 3 images have no caption: 5_carl/a.png, 5_carl/b.png, 5_carl/c.png"
    workloads.finish_pod(ns, wait_for_running_pod(k8s.CoreV1Api(kube), ns, "carl-v1"), exit_code=3, message=message)
    v1 = wait_for(
        lambda: (v := _version(kube, ns, "carl", "v1")).get("state") == "Failed" and v, timeout=60, what="v1 failed"
    )
    assert message in v1["reason"]
    assert "PodFailurePolicy" in v1["reason"]
    assert v1["badInput"] is True
    dataset = _condition(_status(kube, ns, "carl"), "DatasetValid")
    assert (dataset["status"], dataset["reason"]) == ("False", "DatasetInvalid")
    pods = k8s.CoreV1Api(kube).list_namespaced_pod(ns, label_selector="job-name=carl-v1").items
    assert len(pods) == 1, "bad input must not be retried"
    events = k8s.CoreV1Api(kube).list_namespaced_event(ns, field_selector="involvedObject.name=carl").items
    assert "Failed" in {e.reason for e in events}


def test_serving_only_changes_never_train_but_training_changes_do(
    operator: OperatorProcess, kube: k8s.ApiClient, workloads: ControlPlane, s3: Any, artifacts_bucket: str, ns: str
) -> None:
    k8s.CustomObjectsApi(kube).create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, _manifest("dora"))
    _train_successfully(kube, s3, workloads, artifacts_bucket, ns, "dora", "v1")

    _patch_spec(
        kube, ns, "dora", {"serving": {"pinned": True, "server": "sdxl-main"}, "retention": {"keepVersions": 3}}
    )
    wait_for(lambda: _status(kube, ns, "dora").get("observedGeneration") == 2, timeout=30, what="generation 2 seen")
    time.sleep(2)  # a wrongly started Job would have appeared by now
    assert _jobs(kube, ns) == ["dora-v1"]

    _patch_spec(kube, ns, "dora", {"training": {"rank": 8}})
    wait_for(lambda: _jobs(kube, ns) == ["dora-v1", "dora-v2"], timeout=30, what="Job dora-v2")
    v2 = wait_for(lambda: _version(kube, ns, "dora", "v2"), timeout=30, what="v2 in status")
    assert v2["generation"] == 3
    status = _status(kube, ns, "dora")
    assert status["servedVersion"] == "v1"  # keeps serving v1 while v2 trains
    assert _condition(status, "Ready")["reason"] == "ServingPreviousVersion"

    _train_successfully(kube, s3, workloads, artifacts_bucket, ns, "dora", "v2")
    assert wait_for(lambda: _status(kube, ns, "dora").get("servedVersion") == "v2", timeout=30, what="promotion")

    _patch_spec(kube, ns, "dora", {"serving": {"version": "v1"}})  # roll back: no training either
    wait_for(lambda: _status(kube, ns, "dora").get("servedVersion") == "v1", timeout=30, what="rollback")
    assert _jobs(kube, ns) == ["dora-v1", "dora-v2"]


def test_restart_after_job_creation_adopts_the_job(
    operator: OperatorProcess, kube: k8s.ApiClient, workloads: ControlPlane, ns: str
) -> None:
    """The operator dies after creating Job erin-v1 and before recording it: the restarted operator adopts the
    Job instead of creating a second one (the crash state is built exactly as the operator builds it)."""
    operator.kill()
    try:
        created = k8s.CustomObjectsApi(kube).create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, _manifest("erin")
        )
        lora = CharacterLoRA.model_validate(created)
        config = OperatorConfig(s3_bucket=operator.bucket, s3_endpoint=operator.minio.endpoint)
        k8s.BatchV1Api(kube).create_namespaced_job(ns, build_training_job(lora, version="v1", config=config))
        assert _status(kube, ns, "erin") == {}
    finally:
        operator.start()
    versions = wait_for(lambda: _status(kube, ns, "erin").get("versions"), timeout=30, what="status after restart")
    assert [(v["name"], v["jobName"]) for v in versions] == [("v1", "erin-v1")]
    time.sleep(2)
    assert _jobs(kube, ns) == ["erin-v1"]
    assert [v["name"] for v in _status(kube, ns, "erin")["versions"]] == ["v1"]


def test_restart_with_a_changed_spec_adopts_then_trains_the_new_spec(
    operator: OperatorProcess, kube: k8s.ApiClient, workloads: ControlPlane, ns: str
) -> None:
    operator.kill()
    try:
        created = k8s.CustomObjectsApi(kube).create_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, _manifest("finn")
        )
        lora = CharacterLoRA.model_validate(created)
        config = OperatorConfig(s3_bucket=operator.bucket, s3_endpoint=operator.minio.endpoint)
        k8s.BatchV1Api(kube).create_namespaced_job(ns, build_training_job(lora, version="v1", config=config))
        _patch_spec(kube, ns, "finn", {"training": {"rank": 4}})
    finally:
        operator.start()
    versions = wait_for(
        lambda: (v := _status(kube, ns, "finn").get("versions") or []) and len(v) == 2 and v,
        timeout=30,
        what="two versions",
    )
    assert [(v["name"], v["generation"]) for v in versions] == [("v1", 2), ("v2", 2)]
    assert _jobs(kube, ns) == ["finn-v1", "finn-v2"]
    assert versions[0]["trainingHash"] != versions[1]["trainingHash"]


def test_retention_deletes_old_versions_but_never_the_served_one(
    operator: OperatorProcess, kube: k8s.ApiClient, workloads: ControlPlane, s3: Any, artifacts_bucket: str, ns: str
) -> None:
    custom = k8s.CustomObjectsApi(kube)
    custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, _manifest("gina", retention={"keepVersions": 1}, serving={"version": "v1"})
    )
    _train_successfully(kube, s3, workloads, artifacts_bucket, ns, "gina", "v1")
    _patch_spec(kube, ns, "gina", {"training": {"rank": 8}})
    _train_successfully(kube, s3, workloads, artifacts_bucket, ns, "gina", "v2")

    def keys(version: str) -> list[str]:
        _, prefix = version_uri(artifacts_bucket, ns, "gina", version)
        return [o["Key"] for o in s3.list_objects_v2(Bucket=artifacts_bucket, Prefix=prefix).get("Contents", [])]

    # v1 is pinned for serving and v2 is the newest: both stay although keepVersions is 1.
    assert [v["name"] for v in _status(kube, ns, "gina")["versions"]] == ["v1", "v2"]
    assert keys("v1")
    assert keys("v2")

    _patch_spec(kube, ns, "gina", {"serving": {"version": None}})  # unpin: v1 is now beyond keepVersions
    wait_for(
        lambda: [v["name"] for v in _status(kube, ns, "gina")["versions"]] == ["v2"],
        timeout=30,
        what="v1 removed from status",
    )
    assert keys("v1") == []
    assert keys("v2"), "the newest succeeded version is never deleted"
    assert _status(kube, ns, "gina")["servedVersion"] == "v2"


@pytest.mark.parametrize("policy", ["Delete", "Retain"])
def test_deletion_policy(
    policy: str,
    operator: OperatorProcess,
    kube: k8s.ApiClient,
    workloads: ControlPlane,
    s3: Any,
    artifacts_bucket: str,
    ns: str,
) -> None:
    custom = k8s.CustomObjectsApi(kube)
    custom.create_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, _manifest("hana", retention={"deletionPolicy": policy})
    )
    _train_successfully(kube, s3, workloads, artifacts_bucket, ns, "hana", "v1")
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "hana")

    def gone() -> bool:
        try:
            _get(kube, ns, "hana")
        except ApiException as err:
            return bool(err.status == 404)
        return False

    wait_for(gone, timeout=30, what="the object to be deleted")
    remaining = s3.list_objects_v2(Bucket=artifacts_bucket, Prefix=f"loras/{ns}/hana/").get("KeyCount", 0)
    if policy == "Delete":
        assert remaining == 0
    else:
        assert remaining == 3  # lora, grid, manifest
