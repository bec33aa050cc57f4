"""Session fixtures of the trainer tests: tiny random diffusers pipelines (built once, no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from charlora.devtools.tiny_models import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny") / "sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)
