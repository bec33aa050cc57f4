"""Session fixtures of the trainer tests: tiny random diffusers pipelines (built once, no downloads), S3 settings
for the real MinIO of the test world, and helpers to put generated datasets there."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from charlora.api.trainingjob import TrainingJobConfig
from charlora.devtools.datasets import write_kohya_dataset
from charlora.devtools.minio import MinioServer
from charlora.devtools.tiny_models import build_tiny_pipeline
from charlora.storing import S3Settings, open_store
from charlora_trainer.recipe import LoRARecipe


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny") / "sd15", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


@pytest.fixture(scope="session")
def s3_settings(minio: MinioServer) -> S3Settings:
    return S3Settings(endpoint=minio.endpoint, access_key=minio.access_key, secret_key=minio.secret_key)


@pytest.fixture(scope="session")
def s3_env(minio: MinioServer) -> dict[str, str]:
    """The environment a trainer pod gets for the test MinIO."""
    return {
        "CHARLORA_S3_ENDPOINT": minio.endpoint,
        "AWS_ACCESS_KEY_ID": minio.access_key,
        "AWS_SECRET_ACCESS_KEY": minio.secret_key,
    }


@pytest.fixture
def upload_dir(s3_settings: S3Settings, bucket: str) -> Callable[[Path, str], str]:
    """Copies a local directory to s3://<bucket>/<prefix>/ and returns that URI."""

    def upload(local: Path, prefix: str) -> str:
        uri = f"s3://{bucket}/{prefix.strip('/')}/"
        store = open_store(uri, s3_settings)
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            store.upload_file(uri + path.relative_to(local).as_posix(), path)
        return uri

    return upload


def job_config(
    *,
    family: str,
    model: Path | str,
    dataset_uri: str,
    output_uri: str,
    training: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A TrainingJobConfig (wire form) for a 64 px tiny-model run."""
    return {
        "namespace": "team-a",
        "character": "anna",
        "version": "v1",
        "baseModel": {"family": family, "uri": str(model), "version": "tiny-1"},
        "dataset": {"uri": dataset_uri},
        "training": {
            "resolution": 64,
            "mixedPrecision": "no",
            "buckets": {"minResolution": 64},
            **(training or {}),
        },
        "outputUri": output_uri,
        "sampleSteps": 2,
        **extra,
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="session")
def local_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 captioned 64 px images: 6 repeated twice, 6 once (18 samples per epoch). Read-only for the tests."""
    return write_kohya_dataset(tmp_path_factory.mktemp("datasets") / "anna", folders={"2_anna": 6, "1_anna": 6})


@pytest.fixture
def make_recipe(tmp_path: Path, local_dataset: Path, tiny_sd15: Path, tiny_sdxl: Path) -> Callable[..., LoRARecipe]:
    """A set-up recipe on the tiny model of ``family`` with the local dataset and a file:// output."""

    def make(family: str = "sd15", logs: list[str] | None = None, **training: Any) -> LoRARecipe:
        model = tiny_sd15 if family == "sd15" else tiny_sdxl
        config = job_config(
            family=family,
            model=model,
            dataset_uri=local_dataset.as_uri(),
            output_uri=(tmp_path / f"out-{family}").as_uri(),
            training=training,
        )
        recipe = LoRARecipe(
            TrainingJobConfig.model_validate(config),
            workdir=tmp_path / f"work-{family}",
            log=(logs.append if logs is not None else lambda _: None),
        )
        recipe.setup()
        return recipe

    return make
