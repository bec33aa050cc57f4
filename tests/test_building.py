"""Pure builders: the training Job manifest compared against expected dicts, without a cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

from charlora.api.characterlora import CharacterLoRA
from charlora.api.trainingjob import TrainingJobConfig
from charlora.building import build_training_job, job_name, training_hash
from charlora.config import OperatorConfig

CONFIG = OperatorConfig(trainer_image="registry.example/trainer:1", s3_endpoint="http://minio:9000", s3_bucket="art")


def _lora(**spec: Any) -> CharacterLoRA:
    body = {
        "apiVersion": "charlora.dev/v1alpha1",
        "kind": "CharacterLoRA",
        "metadata": {"name": "anna", "namespace": "companions", "uid": "u-1", "generation": 1},
        "spec": {
            "baseModel": {"family": "sdxl", "uri": "s3://models/sdxl/", "version": "sdxl-base-1.0"},
            "dataset": {"uri": "s3://datasets/anna/"},
            **spec,
        },
    }
    return CharacterLoRA.model_validate(body)


def test_default_job_for_one_gpu() -> None:
    job = build_training_job(_lora(), version="v1", config=CONFIG)
    env = {item["name"]: item for item in job["spec"]["template"]["spec"]["containers"][0].pop("env")}
    assert job == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": "anna-v1",
            "namespace": "companions",
            "labels": {
                "app.kubernetes.io/managed-by": "charlora",
                "charlora.dev/character": "anna",
                "charlora.dev/version": "v1",
            },
            "annotations": {"charlora.dev/training-hash": training_hash(_lora())},
            "ownerReferences": [
                {
                    "apiVersion": "charlora.dev/v1alpha1",
                    "kind": "CharacterLoRA",
                    "name": "anna",
                    "uid": "u-1",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "backoffLimit": 3,
            "activeDeadlineSeconds": 86400,
            "ttlSecondsAfterFinished": 604800,
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3]},
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": {
                "metadata": {
                    "labels": {
                        "app.kubernetes.io/managed-by": "charlora",
                        "charlora.dev/character": "anna",
                        "charlora.dev/version": "v1",
                    }
                },
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 1000,
                        "runAsGroup": 1000,
                        "fsGroup": 1000,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "trainer",
                            "image": "registry.example/trainer:1",
                            "imagePullPolicy": "IfNotPresent",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "terminationMessagePolicy": "FallbackToLogsOnError",
                            "volumeMounts": [
                                {"name": "scratch", "mountPath": "/scratch"},
                                {"name": "dshm", "mountPath": "/dev/shm"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "scratch", "emptyDir": {}},
                        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                    ],
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                },
            },
        },
    }
    assert env["AWS_ACCESS_KEY_ID"] == {
        "name": "AWS_ACCESS_KEY_ID",
        "valueFrom": {"secretKeyRef": {"name": "charlora-s3", "key": "AWS_ACCESS_KEY_ID"}},
    }
    assert env["CHARLORA_S3_ENDPOINT"]["value"] == "http://minio:9000"
    config = TrainingJobConfig.model_validate_json(env["CHARLORA_TRAINING_CONFIG"]["value"])
    assert config.output_uri == "s3://art/loras/companions/anna/v1/"
    assert (config.version, config.character, config.namespace) == ("v1", "anna", "companions")
    assert config.training.unet_learning_rate == "1e-4"


def test_overrides_queue_and_resources() -> None:
    lora = _lora(
        resources={
            "gpus": 2,
            "gpuResourceName": "nvidia.com/mig-3g.40gb",
            "cpu": 8,
            "memory": "64Gi",
            "nodeSelector": {"pool": "a100"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "train", "effect": "NoSchedule"}],
            "priorityClassName": "training",
            "activeDeadlineSeconds": 3600,
            "queueName": "gpu-queue",
        },
        storage={"bucket": "own", "prefix": "", "credentialsSecret": "anna-s3", "endpoint": "https://s3.example"},
    )
    job = build_training_job(lora, version="v7", config=CONFIG)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["torchrun", "--standalone", "--nproc-per-node=2", "-m", "charlora_trainer"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    assert job["spec"]["activeDeadlineSeconds"] == 3600
    assert container["resources"] == {
        "limits": {"nvidia.com/mig-3g.40gb": "2", "cpu": "8", "memory": "64Gi"},
        "requests": {"cpu": "8", "memory": "64Gi"},
    }
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "train", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training"
    env = {item["name"]: item for item in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "anna-s3"
    assert env["CHARLORA_S3_ENDPOINT"]["value"] == "https://s3.example"
    assert json.loads(env["CHARLORA_TRAINING_CONFIG"]["value"])["outputUri"] == "s3://own/companions/anna/v7/"


def test_cpu_training_has_no_gpu_placement() -> None:
    pod = build_training_job(_lora(resources={"gpus": 0}), version="v1", config=CONFIG)["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod
    assert "tolerations" not in pod
    assert "limits" not in pod["containers"][0]["resources"]


def test_training_hash_ignores_serving_and_retention() -> None:
    base = training_hash(_lora())
    assert training_hash(_lora(serving={"version": "v2", "pinned": True}, retention={"keepVersions": 2})) == base
    assert training_hash(_lora(training={"rank": 8})) != base
    assert training_hash(_lora(dataset={"uri": "s3://datasets/anna/", "revision": "2"})) != base
    assert training_hash(_lora(resources={"gpus": 2})) != base


@pytest.mark.parametrize("name", ["anna", "a" * 60, "b" * 253])
def test_job_names_fit_a_label_value(name: str) -> None:
    built = job_name(name, "v12")
    assert len(built) <= 63
    assert built.endswith("-v12")
    assert job_name(name, "v12") == built  # deterministic
