"""The operator's own configuration, read once at start-up from ``CHARLORA_*`` environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field


class OperatorConfig(BaseModel):
    """Defaults the operator applies where a CharacterLoRA leaves something unset."""

    model_config = ConfigDict(frozen=True)

    trainer_image: str = Field(default="ghcr.io/charlora/trainer:0.1.0", description="Image of training Jobs.")
    image_pull_policy: str = "IfNotPresent"
    s3_endpoint: str | None = Field(default=None, description="Default S3 endpoint URL (unset: AWS).")
    s3_bucket: str = Field(default="charlora", description="Default bucket for artifacts.")
    s3_prefix: str = Field(default="loras", description="Default key prefix inside the bucket.")
    s3_region: str = "us-east-1"
    credentials_secret: str | None = Field(
        default="charlora-s3",
        description="Default Secret (in the CharacterLoRA's namespace) with AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, used by training Jobs and by the operator to read progress and manifests.",
    )
    progress_interval_seconds: float = Field(
        default=10.0, gt=0, description="How often a running version's Job and progress.json are read."
    )
    backoff_limit: int = Field(default=3, ge=0, description="Retries of a training pod (preemptions not counted).")
    ttl_seconds_after_finished: int = Field(default=7 * 24 * 3600, ge=0)
    default_active_deadline_seconds: int = Field(default=24 * 3600, ge=60)
    checkpoint_every_steps: int = Field(default=200, ge=1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        values: dict[str, str | None] = {
            name: env[f"CHARLORA_{name.upper()}"] for name in cls.model_fields if f"CHARLORA_{name.upper()}" in env
        }
        if values.get("credentials_secret") == "":
            values["credentials_secret"] = None  # set but empty: Jobs and the operator use ambient credentials
        return cls.model_validate(values)
