"""The CharacterLoRA resource: what a platform team wants trained and served for one character."""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from charlora.api.base import (
    PLACEHOLDER,
    ApiModel,
    Condition,
    NonNegativeNumber,
    PositiveNumber,
    StatusModel,
    VersionName,
    cel_rules,
    find_placeholders,
)

KIND = "CharacterLoRA"
PLURAL = "characterloras"
SHORT_NAMES = ("clora",)

Family = Literal["sd15", "sdxl"]
DEFAULT_RESOLUTION: dict[str, int] = {"sd15": 512, "sdxl": 1024}
DEFAULT_EPOCHS = 10
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"


class BaseModelSpec(ApiModel):
    """The base checkpoint the LoRA is trained on and belongs to."""

    family: Family = Field(description="Architecture family of the base model: sd15 (Stable Diffusion 1.x) or sdxl.")
    uri: str = Field(
        min_length=1,
        max_length=1024,
        description="Where the trainer loads the base model from: an s3:// prefix holding a diffusers folder, "
        "a path inside the trainer image, or a hub id.",
    )
    version: str = Field(
        min_length=1,
        max_length=253,
        description="Version of the base model the LoRA belongs to, e.g. sdxl-base-1.0. Recorded with every "
        "artifact; an inference server refuses a LoRA whose base-model version differs from its own.",
    )


class DatasetSpec(ApiModel):
    """The character's training images and captions."""

    uri: str = Field(
        max_length=1024,
        description="Prefix holding the dataset: s3://bucket/prefix/ (or file:///path for a path mounted into the "
        "trainer). Kohya layout: N_name/ folders where N is the repeat count, each image with a same-named "
        "caption file; a flat folder works too (repeats from the repeats field).",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.startsWith('s3://') || self.startsWith('file:///')",
                    "message": "must start with s3:// or file:/// (supported dataset URI schemes)",
                }
            ]
        },
    )
    revision: str | None = Field(
        default=None,
        max_length=253,
        description="Free-form revision of the dataset. Change it to retrain from the same URI after the "
        "images there changed.",
    )
    caption_extension: str = Field(
        default=".txt", max_length=16, pattern=r"^\.[A-Za-z0-9]+$", description="Extension of caption files."
    )
    repeats: int = Field(
        default=1, ge=1, le=1000, description="Repeats per epoch for images in a flat folder (no N_name/ folders)."
    )
    min_images: int = Field(default=10, ge=1, le=100000, description="The dataset lint refuses fewer images than this.")
    character_token: str | None = Field(
        default=None,
        max_length=253,
        description="The word that names the character. The dataset lint warns about captions that contain it "
        "(describe the scene, not the character). Defaults to the object's name.",
    )

    @model_validator(mode="after")
    def _scheme(self) -> DatasetSpec:
        if not self.uri.startswith(("s3://", "file:///")):
            raise ValueError("dataset.uri must start with s3:// or file:/// (supported dataset URI schemes)")
        return self


class BucketSpec(ApiModel):
    """Aspect-ratio bucketing: images are grouped by shape instead of being cropped square."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "!has(self.minResolution) || !has(self.maxResolution) || self.minResolution <= self.maxResolution",
                "minResolution must not exceed maxResolution",
            )
        )
    )

    enabled: bool = Field(default=True, description="Group images into aspect-ratio buckets.")
    min_resolution: int = Field(default=256, ge=64, le=4096, description="Smallest bucket side in pixels.")
    max_resolution: int = Field(default=2048, ge=64, le=8192, description="Largest bucket side in pixels.")
    step: int = Field(default=64, ge=8, le=512, description="Bucket sides are multiples of this many pixels.")


class TrainingSpec(ApiModel):
    """Hyper-parameters of one training run. Numbers with a fraction are strings ("1e-4"): no floats in the API."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            ("!(has(self.epochs) && has(self.maxSteps))", "set either epochs or maxSteps, not both")
        )
    )

    rank: int = Field(default=16, ge=1, le=512, description="LoRA rank (network_dim): 1 to 512.")
    alpha: int = Field(default=16, ge=1, le=1024, description="LoRA alpha (network_alpha): 1 to 1024.")
    unet_learning_rate: PositiveNumber = Field(
        default="1e-4", description='Learning rate of the UNet LoRA as a string, e.g. "1e-4".'
    )
    text_encoder_learning_rate: PositiveNumber | None = Field(
        default=None,
        description='Learning rate of the text-encoder LoRA as a string, e.g. "5e-5"; defaults to '
        "unetLearningRate. Used only with trainTextEncoder.",
    )
    train_text_encoder: bool = Field(default=False, description="Also train LoRA layers on the text encoder(s).")
    epochs: int | None = Field(
        default=None, ge=1, le=10000, description=f"Number of epochs (default {DEFAULT_EPOCHS}). Not with maxSteps."
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Stop after this many optimizer steps. Not with epochs."
    )
    batch_size: int = Field(default=1, ge=1, le=256, description="Images per optimizer step on each GPU.")
    resolution: int | None = Field(
        default=None,
        ge=64,
        le=4096,
        multiple_of=8,
        description="Training resolution in pixels (multiple of 8). Defaults to 512 for sd15 and 1024 for sdxl.",
    )
    optimizer: Literal["AdamW", "AdamW8bit", "Prodigy"] = Field(
        default="AdamW",
        description="Optimizer: AdamW, AdamW8bit (bitsandbytes on CUDA; falls back to AdamW with a message) or "
        "Prodigy.",
    )
    scheduler: Literal["constant", "cosine", "linear"] = Field(
        default="cosine", description="Learning-rate schedule after warmup: constant, cosine or linear."
    )
    warmup_steps: int = Field(default=0, ge=0, le=1_000_000, description="Linear warmup steps before the schedule.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        default="bf16", description="Mixed precision: no, fp16 or bf16. The SDXL VAE always runs in fp32."
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Random seed of the run.")
    noise_offset: NonNegativeNumber | None = Field(
        default=None, description='Noise offset as a string, e.g. "0.05"; unset disables it.'
    )
    min_snr_gamma: PositiveNumber | None = Field(
        default=None, description='Min-SNR loss weighting gamma as a string, e.g. "5"; unset disables it.'
    )
    gradient_checkpointing: bool = Field(default=True, description="Trade compute for memory in the UNet.")
    cache_latents: bool = Field(default=True, description="Encode every image with the VAE once, before training.")
    caption_dropout_rate: NonNegativeNumber = Field(
        default="0", description='Probability of training on an empty caption, as a string, e.g. "0.05".'
    )
    shuffle_captions: bool = Field(default=False, description="Shuffle comma-separated caption tags every step.")
    keep_tokens: int = Field(default=0, ge=0, le=64, description="Leading caption tags that are never shuffled.")
    clip_skip: int | None = Field(
        default=None, ge=1, le=12, description="Use the output of the n-th last text-encoder layer (sd15)."
    )
    buckets: BucketSpec = Field(default_factory=BucketSpec, description="Aspect-ratio bucketing.")
    sample_prompts: list[Annotated[str, Field(max_length=2048)]] = Field(
        default_factory=list,
        max_length=16,
        description="Prompts rendered into the grid picture for every saved epoch (fixed seed).",
    )
    grid_cfg_scales: list[PositiveNumber] = Field(
        default_factory=lambda: ["4", "7"],
        min_length=1,
        max_length=8,
        description='CFG scales of the grid picture\'s columns, as strings, e.g. ["4", "7"].',
    )
    save_every_n_epochs: int = Field(
        default=1, ge=1, le=10000, description="Keep a LoRA checkpoint every N epochs (epochs/eNNN.safetensors)."
    )

    @model_validator(mode="after")
    def _bucket_bounds(self) -> TrainingSpec:
        if self.buckets.min_resolution > self.buckets.max_resolution:
            raise ValueError("training.buckets: minResolution must not exceed maxResolution")
        return self

    @model_validator(mode="after")
    def _epochs_or_steps(self) -> TrainingSpec:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("training: set either epochs or maxSteps, not both")
        return self

    def resolved_epochs(self) -> int | None:
        """Epochs to run: the spec's, else the default when no step limit is given."""
        if self.epochs is not None:
            return self.epochs
        return None if self.max_steps is not None else DEFAULT_EPOCHS

    def resolved_resolution(self, family: str) -> int:
        return self.resolution if self.resolution is not None else DEFAULT_RESOLUTION[family]


class Toleration(ApiModel):
    """A core/v1 Toleration."""

    key: str | None = Field(default=None, max_length=316, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default).")
    value: str | None = Field(default=None, max_length=253, description="Taint value for the Equal operator.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(default=None, description="How long a NoExecute taint is tolerated.")


class ResourcesSpec(ApiModel):
    """Where and with what the training Job runs."""

    gpus: int = Field(default=1, ge=0, le=64, description="GPUs per training pod (0 trains on CPU).")
    gpu_resource_name: str = Field(
        default=DEFAULT_GPU_RESOURCE, max_length=253, description="Extended resource name of a GPU."
    )
    cpu: int | str | None = Field(
        default=None,
        description="CPU request and limit of the trainer (a quantity such as 8 or 7500m).",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    memory: int | str | None = Field(
        default=None,
        description="Memory request and limit of the trainer (a quantity such as 64Gi).",
        json_schema_extra={"x-kubernetes-int-or-string": True},
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None,
        max_length=64,
        description="Node labels the trainer must run on. Unset: nvidia.com/gpu.present=true when gpus > 0.",
    )
    tolerations: list[Toleration] | None = Field(
        default=None,
        max_length=32,
        description="Tolerations of the trainer pod. Unset: tolerate the nvidia.com/gpu taint when gpus > 0.",
    )
    priority_class_name: str | None = Field(default=None, max_length=253, description="PriorityClass of the pod.")
    active_deadline_seconds: int | None = Field(
        default=None, ge=60, description="Kill the training Job after this many seconds (default 86400)."
    )
    queue_name: str | None = Field(
        default=None,
        max_length=253,
        description="Kueue LocalQueue to submit the Job to; the Job is created suspended and Kueue admits it.",
    )


class StorageSpec(ApiModel):
    """Where the versions are stored; anything unset comes from the operator's configuration."""

    endpoint: str | None = Field(
        default=None, max_length=1024, description="S3 endpoint URL, e.g. https://minio.storage:9000."
    )
    bucket: str | None = Field(default=None, max_length=63, description="Bucket holding the artifacts.")
    prefix: str | None = Field(default=None, max_length=512, description="Key prefix inside the bucket.")
    credentials_secret: str | None = Field(
        default=None,
        max_length=253,
        description="Secret in the object's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
    )


class ServingSpec(ApiModel):
    """Which version a CharacterServer serves. Changing it never starts a training run."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            ("!has(self.epoch) || has(self.version)", "epoch needs version: name the version whose epoch to serve")
        )
    )

    server: str | None = Field(
        default=None, max_length=507, description="CharacterServer that serves this character: name or namespace/name."
    )
    version: VersionName | None = Field(
        default=None, description="Serve this version (v1, v2, ...). Unset: the latest succeeded version."
    )
    epoch: int | None = Field(default=None, ge=1, description="Serve this epoch's checkpoint of the version.")
    pinned: bool = Field(default=False, description="Keep this character loaded on every replica (never evicted).")

    @model_validator(mode="after")
    def _epoch_needs_version(self) -> ServingSpec:
        if self.epoch is not None and self.version is None:
            raise ValueError("serving: epoch needs version: name the version whose epoch to serve")
        return self


class RetentionSpec(ApiModel):
    """How many versions are kept in object storage."""

    keep_versions: int = Field(
        default=5,
        ge=1,
        le=1000,
        description="Keep the newest N versions; older ones are deleted, except the served one.",
    )
    deletion_policy: Literal["Retain", "Delete"] = Field(
        default="Retain", description="On deletion of this object: Retain (default) or Delete its artifacts."
    )


class CharacterLoRASpec(ApiModel):
    """What the platform team wants for one character."""

    @model_validator(mode="before")
    @classmethod
    def _no_placeholders(cls, data: Any) -> Any:
        if found := find_placeholders(data):
            raise ValueError(f"still holds the {PLACEHOLDER} placeholder at {', '.join(found)}: replace it")
        return data

    base_model: BaseModelSpec = Field(description="The base model the LoRA is trained on.")
    dataset: DatasetSpec = Field(description="The training images and captions.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training hyper-parameters.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Placement and size of the Job.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Object-storage overrides.")
    serving: ServingSpec = Field(default_factory=ServingSpec, description="Which version is served, and where.")
    retention: RetentionSpec = Field(default_factory=RetentionSpec, description="Version retention.")


class Progress(StatusModel):
    """Progress of the running training Job, copied from its progress.json."""

    percent: int = Field(default=0, ge=0, le=100, description="Percent of steps done.")
    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, ge=0, description="Optimizer steps in the run.")
    epoch: int = Field(default=0, ge=0, description="Current epoch.")
    loss: str | None = Field(default=None, max_length=32, description="Recent training loss, as a string.")
    eta: str | None = Field(default=None, max_length=64, description="Estimated time left, e.g. 12m30s.")
    updated_at: datetime.datetime | None = Field(default=None, description="When the trainer wrote this progress.")


class VersionState(StatusModel):
    """One trained (or training) version of the LoRA."""

    name: VersionName = Field(description="Version name: v1, v2, ...")
    generation: int = Field(ge=0, description="The metadata.generation this version was trained from.")
    job_name: str = Field(max_length=63, description="The training Job.")
    state: Literal["Pending", "Running", "Succeeded", "Failed"] = Field(description="State of the version.")
    started_at: datetime.datetime | None = Field(default=None, description="When the Job was created.")
    finished_at: datetime.datetime | None = Field(default=None, description="When the Job finished.")
    artifact_uri: str | None = Field(default=None, max_length=2048, description="Prefix holding the version.")
    sha256: str | None = Field(default=None, max_length=64, description="SHA-256 of lora.safetensors.")
    size: int | None = Field(default=None, ge=0, description="Size of lora.safetensors in bytes.")
    base_model_uri: str | None = Field(default=None, max_length=1024, description="Base model it was trained on.")
    base_model_version: str | None = Field(default=None, max_length=253, description="Base-model version.")
    epochs: list[int] = Field(default_factory=list, max_length=10000, description="Epoch checkpoints available.")
    grid_uri: str | None = Field(default=None, max_length=2048, description="The grid picture of the version.")
    reason: str | None = Field(default=None, max_length=32768, description="Why the version failed.")
    bad_input: bool = Field(default=False, description="The trainer refused its input (dataset, base model).")
    training_hash: str | None = Field(
        default=None, max_length=64, description="Fingerprint of the training-relevant spec this version used."
    )


class CharacterLoRAStatus(StatusModel):
    """What is: the versions, which one is served, and the conditions."""

    observed_generation: int | None = Field(default=None, description="The generation last reconciled.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Conditions: DatasetValid, Trained, Serving and Ready.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    versions: list[VersionState] = Field(default_factory=list, description="Every version, oldest first.")
    latest_version: str | None = Field(default=None, max_length=16, description="Newest succeeded version.")
    served_version: str | None = Field(default=None, max_length=16, description="Version being served.")
    progress: Progress | None = Field(default=None, description="Progress of the running training Job.")


class ObjectMeta(StatusModel):
    """The parts of metadata the operator reads."""

    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class CharacterLoRA(StatusModel):
    """A character LoRA: trained into versions by Jobs, stored in object storage, served by a CharacterServer."""

    api_version: Literal["charlora.dev/v1alpha1"] = Field(default="charlora.dev/v1alpha1", alias="apiVersion")
    kind: Literal["CharacterLoRA"] = "CharacterLoRA"
    metadata: ObjectMeta
    spec: CharacterLoRASpec
    status: CharacterLoRAStatus = Field(default_factory=CharacterLoRAStatus)

    @classmethod
    def from_body(cls, body: Any) -> CharacterLoRA:
        """Validates a body as the apiserver or kopf hands it over (a mapping, possibly read-only)."""
        return cls.model_validate(dict(body))
