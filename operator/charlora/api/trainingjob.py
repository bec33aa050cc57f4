"""The training run's configuration: what the operator hands the trainer container, validated on both sides."""

from __future__ import annotations

from pydantic import Field

from charlora.api.base import ApiModel, VersionName
from charlora.api.characterlora import BaseModelSpec, DatasetSpec, TrainingSpec

CONFIG_ENV = "CHARLORA_TRAINING_CONFIG"
BAD_INPUT_EXIT_CODE = 3
"""The trainer's exit code for bad input (dataset, base model, config): the Job fails at once, without retries."""


class TrainingJobConfig(ApiModel):
    """One version's training run. Passed as JSON in $CHARLORA_TRAINING_CONFIG or ``--config FILE``."""

    namespace: str = Field(description="Namespace of the CharacterLoRA.")
    character: str = Field(description="Name of the CharacterLoRA.")
    version: VersionName = Field(description="The version this run produces.")
    base_model: BaseModelSpec
    dataset: DatasetSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output_uri: str = Field(
        description="The version prefix (s3://bucket/prefix/<namespace>/<character>/vN/ or file:///...) that "
        "receives the artifacts; layout in charlora.artifacts."
    )
    checkpoint_every_steps: int = Field(default=200, ge=1, description="Save resume state every N steps.")
    progress_every_seconds: int = Field(default=5, ge=1, description="Rewrite progress.json this often.")
    sample_steps: int = Field(default=25, ge=1, le=200, description="Denoising steps of each grid.png tile.")
