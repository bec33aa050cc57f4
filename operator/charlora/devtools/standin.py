"""A stand-in for the trainer in operator tests and the demo: writes progress.json, artifacts and manifest.json
exactly where and how the trainer does, without training anything."""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

from charlora.artifacts import GRID, LORA, MANIFEST, PROGRESS, Manifest, ManifestBaseModel, ManifestFile, ProgressReport


def version_uri(bucket: str, namespace: str, name: str, version: str) -> tuple[str, str]:
    """(bucket, key prefix) of a version as the operator's default configuration lays it out."""
    return bucket, f"loras/{namespace}/{name}/{version}/"


def write_progress(s3: Any, bucket: str, prefix: str, *, step: int, total: int, epoch: int, loss: float) -> None:
    report = ProgressReport(
        step=step,
        total_steps=total,
        epoch=epoch,
        total_epochs=10,
        loss=loss,
        it_per_second=2.0,
        eta_seconds=(total - step) / 2.0,
        updated_at=datetime.datetime.now(datetime.UTC),
    )
    s3.put_object(Bucket=bucket, Key=prefix + PROGRESS, Body=report.model_dump_json(by_alias=True).encode())


def write_artifacts(s3: Any, bucket: str, prefix: str, *, namespace: str, name: str, version: str) -> str:
    """Uploads a LoRA file, a grid and the manifest (last), as the trainer does; returns the LoRA's sha256."""
    lora = hashlib.sha256(f"{namespace}/{name}/{version}".encode()).digest() * 1000
    grid = b"\x89PNG fake grid"
    s3.put_object(Bucket=bucket, Key=prefix + LORA, Body=lora)
    s3.put_object(Bucket=bucket, Key=prefix + GRID, Body=grid)
    manifest = Manifest(
        namespace=namespace,
        character=name,
        version=version,
        base_model=ManifestBaseModel(family="sdxl", uri="s3://models/sdxl/", version="sdxl-base-1.0"),
        files=[
            ManifestFile(path=LORA, sha256=hashlib.sha256(lora).hexdigest(), size=len(lora)),
            ManifestFile(path=GRID, sha256=hashlib.sha256(grid).hexdigest(), size=len(grid)),
        ],
        epochs=[2, 4],
        steps=100,
        created_at=datetime.datetime.now(datetime.UTC),
    )
    s3.put_object(Bucket=bucket, Key=prefix + MANIFEST, Body=manifest.model_dump_json(by_alias=True).encode())
    return hashlib.sha256(lora).hexdigest()
