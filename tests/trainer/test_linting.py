"""The dataset lint: every fatal problem exits with the bad-input code and a message naming the files, no trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from charlora.api.characterlora import DatasetSpec
from charlora.api.trainingjob import BAD_INPUT_EXIT_CODE
from charlora.devtools.datasets import write_image, write_kohya_dataset
from charlora.storing import S3Settings, open_store
from charlora_trainer.__main__ import main
from charlora_trainer.datasets import scan_dataset
from charlora_trainer.failing import TERMINATION_LOG_ENV
from charlora_trainer.linting import lint_dataset
from tests.trainer.conftest import job_config, write_config

REPO = Path(__file__).resolve().parents[2]


def run_lint(
    tmp_path: Path,
    dataset: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    **dataset_spec: object,
) -> tuple[int, str, dict[str, object]]:
    """Runs the trainer's entry point in-process; returns (exit code, termination message, lint.json)."""
    log = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(log))
    out = tmp_path / "out"
    config = job_config(
        family="sd15", model=tmp_path / "no-model-needed", dataset_uri=dataset.as_uri(), output_uri=out.as_uri()
    )
    config["dataset"].update(dataset_spec)
    code = main(["--config", str(write_config(tmp_path / "train.json", config)), "--workdir", str(tmp_path / "work")])
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    message = log.read_text() if log.exists() else ""
    assert message.strip() in stderr  # the same words on stderr and in the termination log
    report = json.loads((out / "lint.json").read_text()) if (out / "lint.json").exists() else {}
    return code, message, report


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return write_kohya_dataset(tmp_path / "dataset", folders={"3_anna": 12})


def codes(report: dict[str, object], kind: str = "errors") -> list[str]:
    problems = report[kind]
    assert isinstance(problems, list)
    return [p["code"] for p in problems]


def test_no_images(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dataset" / "3_anna").mkdir(parents=True)
    code, message, report = run_lint(tmp_path, tmp_path / "dataset", capsys, monkeypatch)
    assert code == BAD_INPUT_EXIT_CODE
    assert "no_images" in message
    assert codes(report) == ["no_images"]


def test_missing_caption(
    tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (good / "3_anna" / "img004.txt").unlink()
    (good / "3_anna" / "img007.txt").unlink()
    code, message, report = run_lint(tmp_path, good, capsys, monkeypatch)
    assert code == BAD_INPUT_EXIT_CODE
    assert "missing_caption: 2 images have no caption file: 3_anna/img004.png, 3_anna/img007.png" in message
    assert codes(report) == ["missing_caption"]


def test_unreadable_image(
    tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = good / "3_anna" / "img003.png"
    broken.write_bytes(broken.read_bytes()[:100])  # a truncated upload
    (good / "3_anna" / "notes.jpg").write_bytes(b"not an image")
    (good / "3_anna" / "notes.txt").write_text("a caption")
    code, message, _ = run_lint(tmp_path, good, capsys, monkeypatch)
    assert code == BAD_INPUT_EXIT_CODE
    assert "unreadable_image: 2 images are corrupt or not readable as images" in message
    assert "3_anna/img003.png" in message
    assert "3_anna/notes.jpg" in message


def test_image_too_small(
    tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_image(good / "3_anna" / "tiny.png", seed=99, size=(24, 24))
    (good / "3_anna" / "tiny.txt").write_text("a small picture")
    code, message, _ = run_lint(tmp_path, good, capsys, monkeypatch)
    assert code == BAD_INPUT_EXIT_CODE
    assert "image_too_small: 1 images are smaller than 32 px" in message
    assert "3_anna/tiny.png (24x24)" in message


def test_too_few_images(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = write_kohya_dataset(tmp_path / "dataset", folders={"5_anna": 4})
    code, message, _ = run_lint(tmp_path, dataset, capsys, monkeypatch, minImages=5)
    assert code == BAD_INPUT_EXIT_CODE
    assert "too_few_images: 4 images, fewer than the minimum of 5" in message


def test_near_duplicates(
    tmp_path: Path, good: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A re-encoded, resized copy of an image is still the same picture.
    with Image.open(good / "3_anna" / "img002.png") as original:
        original.convert("RGB").resize((80, 80)).save(good / "3_anna" / "copy.jpg", quality=85)
    (good / "3_anna" / "copy.txt").write_text("a copy")
    code, message, _ = run_lint(tmp_path, good, capsys, monkeypatch)
    assert code == BAD_INPUT_EXIT_CODE
    assert "near_duplicates: 2 images are near-duplicates of each other (keep one): " in message
    assert "3_anna/copy.jpg" in message
    assert "3_anna/img002.png" in message


def test_warnings_do_not_fail(good: Path) -> None:
    (good / "3_anna" / "img001.txt").write_text("Anna smiling at the beach")
    (good / "3_anna" / "img005.txt").write_text("a hannah montana poster")  # not the word "anna"
    (good / "3_anna" / "img006.txt").write_text("")
    (good / "old").mkdir()
    spec = DatasetSpec(uri=good.as_uri())
    report = lint_dataset(scan_dataset(good, spec), resolution=64, min_images=10, character_token="anna")
    assert report.ok
    assert [(p.code, p.files) for p in report.warnings] == [
        ("caption_names_character", ["3_anna/img001.png"]),
        ("empty_caption", ["3_anna/img006.png"]),
        ("ignored_folder", ["old/"]),
    ]
    assert report.samples_per_epoch == 36


def test_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(tmp_path / "log"))
    path = write_config(tmp_path / "train.json", {"namespace": "a", "character": "b"})
    assert main(["--config", str(path)]) == BAD_INPUT_EXIT_CODE
    message = (tmp_path / "log").read_text()
    assert message.startswith("Invalid training config: ")
    assert "baseModel: Field required" in message
    assert "Traceback" not in capsys.readouterr().err


def test_bad_dataset_in_s3_exits_3_from_a_real_process(
    tmp_path: Path,
    good: Path,
    upload_dir: Callable[[Path, str], str],
    s3_env: dict[str, str],
    s3_settings: S3Settings,
    bucket: str,
) -> None:
    (good / "3_anna" / "img010.txt").unlink()
    dataset_uri = upload_dir(good, "datasets/anna")
    output_uri = f"s3://{bucket}/versions/team-a/anna/v1/"
    config = job_config(family="sd15", model=tmp_path / "unused", dataset_uri=dataset_uri, output_uri=output_uri)
    log = tmp_path / "termination-log"
    env = {**os.environ, **s3_env, TERMINATION_LOG_ENV: str(log), "CHARLORA_TRAINING_CONFIG": json.dumps(config)}
    done = subprocess.run(
        [sys.executable, "-m", "charlora_trainer", "--workdir", str(tmp_path / "work")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == BAD_INPUT_EXIT_CODE, done.stderr
    assert "Traceback" not in done.stderr
    assert "missing_caption: 1 images have no caption file: 3_anna/img010.png" in log.read_text()
    report = json.loads(open_store(output_uri, s3_settings).read_bytes(output_uri + "lint.json"))
    assert [p["files"] for p in report["errors"]] == [["3_anna/img010.png"]]
    assert not open_store(output_uri, s3_settings).exists(output_uri + "manifest.json")
