"""Inputs other than the dataset: the base model from an s3:// prefix (downloaded once), family mismatches and
unreachable models as bad input, the text-embedding cache, progress.json pacing, termination-message limits."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from charlora import artifacts
from charlora.api.characterlora import BaseModelSpec
from charlora.storing import S3Settings, open_store
from charlora_trainer.__main__ import main
from charlora_trainer.failing import TERMINATION_LOG_ENV, TERMINATION_MESSAGE_LIMIT, BadInput, report_bad_input
from charlora_trainer.models import load_base_model, locate_base_model
from charlora_trainer.progressing import ProgressWriter
from charlora_trainer.recipe import LoRARecipe
from tests.trainer.conftest import job_config, write_config


def test_base_model_from_s3_is_downloaded_once(
    tmp_path: Path, tiny_sdxl: Path, upload_dir: Callable[[Path, str], str], s3_settings: S3Settings, bucket: str
) -> None:
    uri = upload_dir(tiny_sdxl, "models/tiny-sdxl")
    spec = BaseModelSpec(family="sdxl", uri=uri, version="tiny-1")
    local = locate_base_model(spec, cache_dir=tmp_path / "cache", settings=s3_settings)
    base = load_base_model(local, "sdxl")
    assert len(base.text_encoders) == 2
    assert base.align == 16  # VAE factor 8 x one UNet downsampling
    open_store(uri, s3_settings).delete_prefix(uri)  # the second lookup must not need the store
    assert locate_base_model(spec, cache_dir=tmp_path / "cache", settings=s3_settings) == local


def test_base_model_problems_are_bad_input(tmp_path: Path, tiny_sd15: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadInput, match=r"baseModel.family is sdxl but the model at .* is a sd15 pipeline"):
        load_base_model(tiny_sd15, "sdxl")
    with pytest.raises(BadInput, match=r"is not a diffusers folder \(no model_index.json\)"):
        load_base_model(tmp_path, "sd15")
    with pytest.raises(BadInput, match=r"The base model /nonexistent/model is not a directory"):
        locate_base_model(BaseModelSpec(family="sd15", uri="/nonexistent/model", version="x"), cache_dir=tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no machine here reaches a hub: fail fast, as a bad input
    with pytest.raises(BadInput, match=r"Could not fetch the base model 'someone/no-such-model' from the hub"):
        locate_base_model(BaseModelSpec(family="sd15", uri="someone/no-such-model", version="x"), cache_dir=tmp_path)


def test_frozen_text_encoder_embeddings_are_cached(make_recipe: Callable[..., LoRARecipe]) -> None:
    recipe = make_recipe("sdxl", trainTextEncoder=False, captionDropoutRate="0.1")
    # filled in setup(): every caption of the dataset and the empty one of caption dropout
    assert set(recipe.text_cache or {}) == {s.caption for s in recipe.samples} | {""}
    batch = recipe.make_batch([0, 1], step=0)
    first = recipe._encode_text(batch.captions)
    again = recipe._encode_text(batch.captions)
    assert again[0].shape == (2, 77, 64)  # both encoders' hidden states, concatenated
    assert first[1] is not None
    assert again[1] is not None
    assert (first[0] - again[0]).abs().max() == 0
    assert (first[1] - again[1]).abs().max() == 0
    trained = make_recipe("sd15", trainTextEncoder=True)
    assert trained.text_cache is None  # a trained encoder changes its embeddings every step


def test_progress_is_paced_and_forced(tmp_path: Path) -> None:
    uri = (tmp_path / "v1").as_uri() + "/" + artifacts.PROGRESS
    writer = ProgressWriter(open_store(uri), uri, every_seconds=3600)
    writer.write(step=1, total_steps=10, epoch=1, loss=0.5, it_per_second=2.0, eta_seconds=4.5)
    writer.write(step=2, total_steps=10, epoch=1)  # within the interval: skipped
    report = artifacts.ProgressReport.model_validate_json((tmp_path / "v1" / artifacts.PROGRESS).read_text())
    assert (report.step, report.loss, report.eta_seconds) == (1, 0.5, 4.5)
    writer.write(step=3, total_steps=10, epoch=1, phase="sampling", force=True)
    report = artifacts.ProgressReport.model_validate_json((tmp_path / "v1" / artifacts.PROGRESS).read_text())
    assert (report.step, report.phase, writer.writes) == (3, "sampling", 2)
    assert report.updated_at.tzinfo == datetime.UTC


def test_termination_message_fits_kubernetes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(tmp_path / "log"))
    assert report_bad_input("x" * 10_000) == 3
    assert len((tmp_path / "log").read_bytes()) <= TERMINATION_MESSAGE_LIMIT + 1
    assert capsys.readouterr().err.startswith("Bad input: xxx")
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(tmp_path / "missing-dir" / "log"))  # not writable: stderr only
    assert report_bad_input(json.dumps({"a": 1})) == 3
    assert 'Bad input: {"a": 1}' in capsys.readouterr().err


def test_storage_failure_is_retryable_with_a_reason(
    tmp_path: Path,
    local_dataset: Path,
    tiny_sd15: Path,
    s3_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(tmp_path / "log"))
    config = job_config(
        family="sd15",
        model=tiny_sd15,
        dataset_uri=local_dataset.as_uri(),
        output_uri="s3://no-such-bucket-charlora/team-a/anna/v1/",
    )
    path = write_config(tmp_path / "train.json", config)
    assert main(["--config", str(path), "--workdir", str(tmp_path / "work")]) == 1
    message = (tmp_path / "log").read_text()
    assert message.startswith("Training failed: StorageError: Could not upload ")
    assert "no-such-bucket-charlora/team-a/anna/v1/" in message
    assert "Traceback" in capsys.readouterr().err  # for the log; the termination message stays one line


def test_default_workdir_follows_the_job_environment(tmp_path: Path) -> None:
    from charlora_trainer.__main__ import default_workdir  # noqa: PLC0415 - one helper of the entry point

    assert default_workdir({"CHARLORA_WORKDIR": "/scratch/w", "TMPDIR": str(tmp_path)}) == Path("/scratch/w")
    tmpdir = tmp_path / "scratch" / "tmp"  # the Job sets TMPDIR into its emptyDir, where it does not exist yet
    assert default_workdir({"TMPDIR": str(tmpdir)}) == tmpdir / "charlora-trainer"
    assert tmpdir.is_dir()


def test_background_uploads_keep_order_and_raise_failures() -> None:
    from charlora_trainer.recipe import BackgroundUploads  # noqa: PLC0415 - one helper of the recipe

    uploads, done = BackgroundUploads(), []
    for index in range(5):
        uploads.submit(lambda index=index: done.append(index))  # type: ignore[misc]
    uploads.wait()
    assert done == [0, 1, 2, 3, 4]

    def fail() -> None:
        raise OSError("connection reset")

    uploads.submit(fail)
    with pytest.raises(OSError, match="connection reset"):
        uploads.wait()
