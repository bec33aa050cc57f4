"""Pure builders: names, labels, storage locations and the training Job manifest of a CharacterLoRA version.

No I/O here: a typed model in, a dict out, so every manifest is unit-tested against an expected dict.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from charlora.api.characterlora import CharacterLoRA
from charlora.api.trainingjob import BAD_INPUT_EXIT_CODE, CONFIG_ENV, TrainingJobConfig
from charlora.artifacts import VersionLocation
from charlora.config import OperatorConfig

MANAGED_BY = {"app.kubernetes.io/managed-by": "charlora"}
CHARACTER_LABEL = "charlora.dev/character"
VERSION_LABEL = "charlora.dev/version"
TRAINING_HASH_ANNOTATION = "charlora.dev/training-hash"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TRAINER_CONTAINER = "trainer"
SCRATCH = "/scratch"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"


def training_hash(lora: CharacterLoRA) -> str:
    """Fingerprint of every training-relevant field: a change means a new version, anything else does not."""
    spec = lora.spec
    relevant = {
        "baseModel": spec.base_model.to_wire(),
        "dataset": spec.dataset.to_wire(),
        "training": spec.training.to_wire(),
        "resources": spec.resources.to_wire(),
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def version_name(number: int) -> str:
    return f"v{number}"


def version_number(name: str) -> int:
    return int(name.removeprefix("v"))


def job_name(character: str, version: str) -> str:
    """``<name>-vN``; shortened with a hash when it would not fit a 63-character label value."""
    name = f"{character}-{version}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(character.encode()).hexdigest()[:8]
    return f"{character[: 63 - len(version) - 10].rstrip('-')}-{digest}-{version}"


def store_uri(lora: CharacterLoRA, config: OperatorConfig) -> str:
    """``s3://bucket/prefix``, from the object's storage overrides or the operator's defaults."""
    storage = lora.spec.storage
    bucket = storage.bucket or config.s3_bucket
    prefix = (storage.prefix if storage.prefix is not None else config.s3_prefix).strip("/")
    return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"


def version_location(lora: CharacterLoRA, version: str, config: OperatorConfig) -> VersionLocation:
    return VersionLocation(
        store_uri=store_uri(lora, config),
        namespace=lora.metadata.namespace or "default",
        character=lora.metadata.name,
        version=version,
    )


def credentials_secret(lora: CharacterLoRA, config: OperatorConfig) -> str | None:
    return lora.spec.storage.credentials_secret or config.credentials_secret


def s3_endpoint(lora: CharacterLoRA, config: OperatorConfig) -> str | None:
    return lora.spec.storage.endpoint or config.s3_endpoint


def build_training_config(lora: CharacterLoRA, *, version: str, config: OperatorConfig) -> TrainingJobConfig:
    """The JSON the trainer container receives, validated by the model the trainer itself reads."""
    spec = lora.spec
    return TrainingJobConfig(
        namespace=lora.metadata.namespace or "default",
        character=lora.metadata.name,
        version=version,
        base_model=spec.base_model,
        dataset=spec.dataset,
        training=spec.training,
        output_uri=version_location(lora, version, config).uri,
        checkpoint_every_steps=config.checkpoint_every_steps,
    )


def _labels(lora: CharacterLoRA, version: str) -> dict[str, str]:
    return {**MANAGED_BY, CHARACTER_LABEL: lora.metadata.name, VERSION_LABEL: version}


def _placement(lora: CharacterLoRA) -> dict[str, Any]:
    resources = lora.spec.resources
    node_selector = resources.node_selector
    if node_selector is None:
        node_selector = {GPU_PRESENT_LABEL: "true"} if resources.gpus else {}
    if resources.tolerations is not None:
        tolerations = [toleration.to_wire() for toleration in resources.tolerations]
    elif resources.gpus:
        # GPU pools are commonly tainted with the GPU resource name so that only GPU pods land there.
        tolerations = [{"key": resources.gpu_resource_name, "operator": "Exists", "effect": "NoSchedule"}]
    else:
        tolerations = []
    placement: dict[str, Any] = {}
    if node_selector:
        placement["nodeSelector"] = dict(node_selector)
    if tolerations:
        placement["tolerations"] = tolerations
    if resources.priority_class_name:
        placement["priorityClassName"] = resources.priority_class_name
    return placement


def _container_resources(lora: CharacterLoRA) -> dict[str, Any]:
    resources = lora.spec.resources
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if resources.gpus:
        limits[resources.gpu_resource_name] = str(resources.gpus)
    for name, value in (("cpu", resources.cpu), ("memory", resources.memory)):
        if value is not None:
            limits[name] = requests[name] = str(value)
    built: dict[str, Any] = {}
    if limits:
        built["limits"] = limits
    if requests:
        built["requests"] = requests
    return built


def _env(lora: CharacterLoRA, *, version: str, config: OperatorConfig) -> list[dict[str, Any]]:
    training_config = build_training_config(lora, version=version, config=config)
    env: list[dict[str, Any]] = [
        {"name": CONFIG_ENV, "value": training_config.model_dump_json(by_alias=True, exclude_none=True)},
        {"name": "AWS_DEFAULT_REGION", "value": config.s3_region},
        {"name": "HOME", "value": SCRATCH},
        {"name": "TMPDIR", "value": f"{SCRATCH}/tmp"},
        {"name": "HF_HOME", "value": f"{SCRATCH}/huggingface"},
    ]
    if endpoint := s3_endpoint(lora, config):
        env.append({"name": "CHARLORA_S3_ENDPOINT", "value": endpoint})
    if secret := credentials_secret(lora, config):
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
    return env


def _command(gpus: int) -> dict[str, Any]:
    """One process per GPU: torchrun starts them and accelerate inside the trainer splits the batches."""
    if gpus <= 1:
        return {}  # the image's entry point: python -m charlora_trainer
    return {"command": ["torchrun", "--standalone", f"--nproc-per-node={gpus}", "-m", "charlora_trainer"]}


def build_training_job(lora: CharacterLoRA, *, version: str, config: OperatorConfig) -> dict[str, Any]:
    """The ``batch/v1`` Job that trains ``version`` of ``lora``."""
    resources = lora.spec.resources
    labels = _labels(lora, version)
    job_labels = dict(labels)
    if resources.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = resources.queue_name
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": config.trainer_image,
        "imagePullPolicy": config.image_pull_policy,
        **_command(resources.gpus),
        "env": _env(lora, version=version, config=config),
        "resources": _container_resources(lora),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        # The trainer writes a one-line reason to /dev/termination-log; a crash falls back to the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": "scratch", "mountPath": SCRATCH},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "scratch", "emptyDir": {}},
            # PyTorch data loaders share tensors through /dev/shm, which is 64 MiB by default.
            {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        ],
        **_placement(lora),
    }
    job_spec: dict[str, Any] = {
        "backoffLimit": config.backoff_limit,
        "activeDeadlineSeconds": resources.active_deadline_seconds or config.default_active_deadline_seconds,
        "ttlSecondsAfterFinished": config.ttl_seconds_after_finished,
        "podFailurePolicy": {
            "rules": [
                # Bad input (dataset, base model, config) does not get better on retry.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [BAD_INPUT_EXIT_CODE],
                    },
                },
                # Preemption, eviction and node drains do not count against backoffLimit.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if resources.queue_name:
        job_spec["suspend"] = True  # Kueue admits the Job by unsuspending it
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(lora.metadata.name, version),
            "namespace": lora.metadata.namespace,
            "labels": job_labels,
            "annotations": {TRAINING_HASH_ANNOTATION: training_hash(lora)},
            # Written out rather than kopf.adopt(): the builder stays free of kopf and of mutation.
            "ownerReferences": [
                {
                    "apiVersion": lora.api_version,
                    "kind": lora.kind,
                    "name": lora.metadata.name,
                    "uid": lora.metadata.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": job_spec,
    }
