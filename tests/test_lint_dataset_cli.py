"""charlora lint-dataset: the trainer's lint as a readable report, from a folder or from MinIO, as a real process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from charlora.devtools.datasets import write_kohya_dataset
from charlora.devtools.minio import MinioServer


def _lint(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "charlora", "lint-dataset", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


def test_good_dataset_report(tmp_path: Path) -> None:
    root = write_kohya_dataset(tmp_path / "anna", folders={"5_anna": 8, "2_anna closeups": 4})
    result = _lint(str(root), "--resolution", "64", "--min-images", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "images:    12   samples per epoch (with repeats): 48" in result.stdout
    assert "5_anna/" in result.stdout
    assert "8 images x 5   = 40" in result.stdout
    assert "image sizes: smallest 64x64" in result.stdout
    assert "result:    OK" in result.stdout


def test_bad_dataset_exits_with_the_bad_input_code_naming_files(tmp_path: Path) -> None:
    root = write_kohya_dataset(tmp_path / "bob", folders={"3_bob": 10})
    (root / "3_bob" / "img002.txt").unlink()
    (root / "3_bob" / "img004.txt").write_text("bob smiling at the camera")
    result = _lint(str(root), "--resolution", "64", "--character-token", "bob")
    assert result.returncode == 3
    assert "missing_caption: 1 images have no caption file: 3_bob/img002.png" in result.stdout
    assert "caption_names_character" in result.stdout
    assert "REFUSED (1 fatal problems)" in result.stdout
    as_json = json.loads(_lint(str(root), "--resolution", "64", "--json").stdout)
    assert [error["code"] for error in as_json["errors"]] == ["missing_caption"]


def test_s3_dataset(tmp_path: Path, minio: MinioServer, s3: Any, bucket: str) -> None:
    root = write_kohya_dataset(tmp_path / "clara", folders={"1_clara": 10})
    for path in root.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"datasets/clara/{path.relative_to(root).as_posix()}")
    env = {
        **os.environ,
        "CHARLORA_S3_ENDPOINT": minio.endpoint,
        "AWS_ACCESS_KEY_ID": minio.access_key,
        "AWS_SECRET_ACCESS_KEY": minio.secret_key,
    }
    result = _lint(f"s3://{bucket}/datasets/clara/", "--resolution", "64", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"dataset:   s3://{bucket}/datasets/clara/" in result.stdout
    assert "images:    10" in result.stdout


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    result = _lint(str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "no such dataset directory" in result.stderr
