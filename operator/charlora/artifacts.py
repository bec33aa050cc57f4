"""The artifact layout of a version in object storage and the schemas of its manifest and progress files.

Shared by the operator (reads progress and manifests, deletes old versions), the trainer (writes them) and the
inference server (reads manifests and LoRAs). Layout, under ``<store>/<namespace>/<character>/vN/``:

    manifest.json                written last: a version without a manifest does not exist
    lora.safetensors             final LoRA, kohya keys + ss_* header (ComfyUI / AUTOMATIC1111)
    lora.diffusers.safetensors   final LoRA, diffusers/PEFT keys
    epochs/eNNN.safetensors      every saved epoch (kohya keys)
    grid.png                     rows = saved epochs (+ no LoRA), columns = CFG scales
    progress.json                rewritten every few seconds while training
    lint.json                    the dataset lint report
    checkpoints/                 resume state; removed after success
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from charlora.api.base import StatusModel

MANIFEST = "manifest.json"
LORA = "lora.safetensors"
LORA_DIFFUSERS = "lora.diffusers.safetensors"
GRID = "grid.png"
PROGRESS = "progress.json"
LINT_REPORT = "lint.json"
EPOCHS_DIR = "epochs/"
CHECKPOINTS_DIR = "checkpoints/"


def epoch_file(epoch: int) -> str:
    return f"{EPOCHS_DIR}e{epoch:03d}.safetensors"


@dataclass(frozen=True)
class VersionLocation:
    """Where one version lives: ``<store_uri>/<namespace>/<character>/<version>/``.

    ``store_uri`` is ``s3://bucket[/prefix]`` or ``file:///path``.
    """

    store_uri: str
    namespace: str
    character: str
    version: str

    @property
    def character_uri(self) -> str:
        return f"{self.store_uri.rstrip('/')}/{self.namespace}/{self.character}/"

    @property
    def uri(self) -> str:
        return f"{self.character_uri}{self.version}/"

    def file(self, name: str) -> str:
        """The URI of one file of the version, e.g. ``location.file(MANIFEST)``."""
        return f"{self.uri}{name}"


class ManifestFile(StatusModel):
    path: str = Field(description="Path relative to the version prefix.")
    sha256: str = Field(min_length=64, max_length=64)
    size: int = Field(ge=0)


class ManifestBaseModel(StatusModel):
    family: Literal["sd15", "sdxl"]
    uri: str
    version: str
    hashes: dict[str, str] = Field(default_factory=dict, description="Component name -> sha256 of its weights.")


class Manifest(StatusModel):
    """manifest.json: the proof that a version is complete, with a checksum for every file it references."""

    schema_version: Literal[1] = 1
    namespace: str
    character: str
    version: str
    base_model: ManifestBaseModel
    files: list[ManifestFile]
    epochs: list[int] = Field(default_factory=list)
    steps: int = Field(ge=0, default=0)
    final_loss: float | None = None
    training: dict[str, object] = Field(default_factory=dict, description="The TrainingSpec the run used.")
    created_at: datetime.datetime
    trainer_version: str = ""

    def entry(self, path: str) -> ManifestFile | None:
        return next((item for item in self.files if item.path == path), None)


class ProgressReport(StatusModel):
    """progress.json, rewritten by the trainer every few seconds."""

    step: int = Field(ge=0)
    total_steps: int = Field(ge=0)
    epoch: int = Field(ge=0)
    total_epochs: int = Field(ge=0, default=0)
    loss: float | None = None
    it_per_second: float | None = None
    eta_seconds: float | None = None
    phase: Literal["preparing", "training", "sampling", "uploading", "done"] = "training"
    updated_at: datetime.datetime
