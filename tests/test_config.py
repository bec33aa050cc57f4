"""The operator's configuration from CHARLORA_* environment variables."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from charlora.config import OperatorConfig


def test_environment_overrides_defaults() -> None:
    config = OperatorConfig.from_env(
        {
            "CHARLORA_S3_BUCKET": "art",
            "CHARLORA_PROGRESS_INTERVAL_SECONDS": "2.5",
            "CHARLORA_BACKOFF_LIMIT": "0",
            "UNRELATED": "x",
        }
    )
    assert (config.s3_bucket, config.progress_interval_seconds, config.backoff_limit) == ("art", 2.5, 0)
    assert config.credentials_secret == "charlora-s3"


def test_empty_credentials_secret_means_ambient_credentials() -> None:
    assert OperatorConfig.from_env({"CHARLORA_CREDENTIALS_SECRET": ""}).credentials_secret is None


def test_bad_values_name_the_setting() -> None:
    with pytest.raises(ValidationError, match="progress_interval_seconds"):
        OperatorConfig.from_env({"CHARLORA_PROGRESS_INTERVAL_SECONDS": "0"})
