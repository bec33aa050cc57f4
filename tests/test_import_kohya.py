"""charlora import-kohya: Kohya configurations (seed-style, in tests/data/) become valid CharacterLoRAs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from charlora.api.characterlora import CharacterLoRA
from charlora.importing import ImportRefused, import_kohya, read_kohya

DATA = Path(__file__).resolve().parent / "data"
TARGET = {"dataset": "s3://datasets/anna/", "base_model_uri": "s3://models/sdxl/", "base_model_version": "sdxl-1.0"}


def _import(name: str, **overrides: Any) -> Any:
    path = DATA / name
    return import_kohya(read_kohya(path.read_text(), filename=path.name), name="anna", **{**TARGET, **overrides})


def test_gui_export_maps_every_setting_with_a_counterpart() -> None:
    result = _import("kohya-gui-anna.json")
    spec = CharacterLoRA.model_validate(result.manifest).spec
    training = spec.training
    assert spec.base_model.family == "sdxl"
    assert (training.rank, training.alpha, training.batch_size, training.epochs, training.seed) == (32, 16, 2, 12, 1234)
    assert (float(training.unet_learning_rate), float(training.text_encoder_learning_rate or 0)) == (1e-4, 5e-5)
    assert training.train_text_encoder is True
    assert (training.optimizer, training.scheduler, training.mixed_precision) == ("AdamW8bit", "cosine", "bf16")
    assert (float(training.noise_offset or 0), float(training.min_snr_gamma or 0)) == (0.05, 5.0)
    assert float(training.caption_dropout_rate) == 0.05
    assert (training.keep_tokens, training.shuffle_captions, training.save_every_n_epochs) == (1, True, 2)
    assert (training.resolution, training.gradient_checkpointing, training.cache_latents) == (1024, True, True)
    assert (training.buckets.min_resolution, training.buckets.max_resolution, training.buckets.step) == (256, 2048, 64)
    assert training.sample_prompts == ["a woman reading in a cafe, window light", "a woman hiking at sunset, wide shot"]
    assert training.grid_cfg_scales == ["4", "7"]
    assert training.clip_skip is None


def test_gui_export_reports_what_it_could_not_carry_with_reasons() -> None:
    result = _import("kohya-gui-anna.json")
    keys = sorted(line.split(" ", 1)[0].rstrip(":") for line in result.not_carried)
    assert keys == ["bucket_no_upscale", "flip_aug", "lr_warmup", "output_name", "xformers"]
    assert all(": " in line and len(line.split(": ", 1)[1]) > 10 for line in result.not_carried)
    # Windows paths are warnings, not crashes, one per key
    assert sorted(w.split(":", 1)[0] for w in result.warnings) == [
        "logging_dir",
        "output_dir",
        "pretrained_model_name_or_path",
        "train_data_dir",
    ]


def test_sd_scripts_toml_with_steps_prodigy_and_clip_skip() -> None:
    result = _import("sd-scripts-bob.toml", base_model_uri="s3://models/sd15/")
    spec = CharacterLoRA.model_validate(result.manifest).spec
    training = spec.training
    assert spec.base_model.family == "sd15"
    assert spec.dataset.caption_extension == ".caption"
    assert (training.max_steps, training.epochs, training.warmup_steps) == (2000, None, 100)
    assert (training.optimizer, training.unet_learning_rate, training.scheduler) == ("Prodigy", "1", "constant")
    assert (training.rank, training.alpha, training.clip_skip, training.batch_size) == (8, 4, 2, 4)
    assert training.train_text_encoder is False  # network_train_unet_only
    assert float(training.noise_offset or 0) == 0.0357
    carried = {line.split(" ", 1)[0].rstrip(":") for line in result.not_carried}
    assert {"xformers", "max_token_length", "sample_prompts"} <= carried


def test_placeholders_refuse_the_import_naming_each_key() -> None:
    with pytest.raises(ImportRefused, match="max_train_epochs, network_alpha, pretrained_model_name_or_path"):
        _import("kohya-template-tune.toml")


def test_gui_warmup_percentage_becomes_steps_when_steps_are_known() -> None:
    result = import_kohya({"max_train_steps": 1500, "lr_warmup": 10, "network_dim": 8}, name="x", **TARGET)
    assert result.manifest["spec"]["training"]["warmupSteps"] == 150


def test_unsupported_choices_are_reported_not_guessed() -> None:
    result = import_kohya({"optimizer": "Lion", "lr_scheduler": "cosine_with_restarts"}, name="x", **TARGET)
    assert "optimizer" not in result.manifest["spec"]["training"]
    assert any(line.startswith("optimizer = 'Lion'") for line in result.not_carried)
    assert any(line.startswith("lr_scheduler = 'cosine_with_restarts'") for line in result.not_carried)


def test_bad_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ImportRefused, match="neither a kohya_ss JSON export nor an sd-scripts TOML"):
        read_kohya("{not json", filename="broken.json")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "charlora",
            "import-kohya",
            str(tmp_path / "missing.json"),
            "--name",
            "x",
            "--dataset",
            "s3://d/",
            "--base-model-uri",
            "u",
            "--base-model-version",
            "v",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "cannot read" in bad.stderr


def test_cli_output_is_accepted_by_the_apiserver(
    tmp_path: Path, kube: k8s.ApiClient, crds_installed: list[str], namespace: str
) -> None:
    out = tmp_path / "anna.yaml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "charlora",
            "import-kohya",
            str(DATA / "kohya-gui-anna.json"),
            "--name",
            "anna",
            "--dataset",
            "s3://datasets/anna/",
            "--base-model-uri",
            "s3://models/sdxl/",
            "--base-model-version",
            "sdxl-base-1.0",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "not carried over: flip_aug" in result.stderr
    manifest = yaml.safe_load(out.read_text())
    created = k8s.CustomObjectsApi(kube).create_namespaced_custom_object(
        "charlora.dev", "v1alpha1", namespace, "characterloras", manifest
    )
    assert created["spec"]["training"]["rank"] == 32
