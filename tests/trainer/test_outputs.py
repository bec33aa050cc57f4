"""A whole run against the real MinIO: every artifact present, checksummed in the manifest (written last), kohya
keys and header right, the diffusers file (and the kohya one) loading with load_lora_weights, the grid's tiles."""

# diffusers ships no type hints for from_pretrained.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load

from charlora import artifacts
from charlora.storing import S3Settings, open_store
from charlora_trainer.__main__ import main
from charlora_trainer.publishing import HEADER_HEIGHT, LABEL_WIDTH
from tests.trainer.conftest import job_config, write_config

KOHYA_KEY = re.compile(r"^(lora_unet|lora_te|lora_te1|lora_te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
PROMPT = "a person standing in a park, tag0"


def render(pipe: Any, *, scale: float = 4.0) -> np.ndarray:
    generator = torch.Generator().manual_seed(42)
    image = pipe(PROMPT, num_inference_steps=2, guidance_scale=scale, generator=generator, output_type="pil").images[0]
    return np.asarray(image, dtype=np.float32)


@pytest.mark.parametrize(
    ("family", "text_encoder"), [("sd15", False), ("sdxl", True)], ids=["sd15-unet", "sdxl-unet+te"]
)
def test_full_run_publishes_a_complete_version(
    family: str,
    text_encoder: bool,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    local_dataset: Path,
    upload_dir: Callable[[Path, str], str],
    s3_env: dict[str, str],
    s3_settings: S3Settings,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model: Path = request.getfixturevalue(f"tiny_{family}")
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    output = f"s3://{bucket}/versions/team-a/anna/v1/"
    config = job_config(
        family=family,
        model=model,
        dataset_uri=upload_dir(local_dataset, "datasets/anna"),
        output_uri=output,
        training={
            "epochs": 2,
            "batchSize": 2,
            "unetLearningRate": "2e-3",
            "trainTextEncoder": text_encoder,
            "samplePrompts": [PROMPT],
            "gridCfgScales": ["1", "4"],
            "minSnrGamma": "5",
        },
        checkpointEverySteps=4,
    )
    assert main(["--config", str(write_config(tmp_path / "train.json", config)), "--workdir", str(tmp_path / "w")]) == 0
    blobs = check_manifest(open_store(output, s3_settings), output, model)
    lora_path = check_kohya(blobs, tmp_path, family=family, text_encoder=text_encoder)
    check_loading_and_grid(blobs, tmp_path, model=model, lora_path=lora_path, family=family)

    # A pod restarted after success (say, killed while deleting checkpoints/) leaves the version as it is.
    before = store_state(open_store(output, s3_settings), output)
    assert main(["--config", str(tmp_path / "train.json"), "--workdir", str(tmp_path / "again")]) == 0
    assert store_state(open_store(output, s3_settings), output) == before


def store_state(store: Any, output: str) -> dict[str, str]:
    return {info.uri: hashlib.sha256(store.read_bytes(info.uri)).hexdigest() for info in store.list(output)}


def check_manifest(store: Any, output: str, model: Path) -> dict[str, bytes]:
    """The manifest lists every file with the checksum of what is really stored; returns the files' bytes."""
    manifest = artifacts.Manifest.model_validate_json(store.read_bytes(output + artifacts.MANIFEST))
    stored = {info.uri.removeprefix(output): info.size for info in store.list(output)}
    expected = {"lint.json", "lora.safetensors", "lora.diffusers.safetensors", "grid.png"}
    expected |= {"epochs/e001.safetensors", "epochs/e002.safetensors"}
    assert {f.path for f in manifest.files} == expected
    assert set(stored) == expected | {"manifest.json", "progress.json"}  # checkpoints/ removed after success
    blobs = {f.path: store.read_bytes(output + f.path) for f in manifest.files}
    for entry in manifest.files:
        assert hashlib.sha256(blobs[entry.path]).hexdigest() == entry.sha256, entry.path
        assert len(blobs[entry.path]) == entry.size == stored[entry.path]
    assert manifest.epochs == [1, 2]
    assert manifest.steps == 18  # 18 samples per epoch at batch size 2: 9 steps, 2 epochs
    assert manifest.final_loss is not None
    assert np.isfinite(manifest.final_loss)
    assert manifest.base_model.version == "tiny-1"
    unet_weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    assert manifest.base_model.hashes["unet"] == hashlib.sha256(unet_weights.read_bytes()).hexdigest()
    progress = artifacts.ProgressReport.model_validate_json(store.read_bytes(output + artifacts.PROGRESS))
    assert (progress.phase, progress.step, progress.total_steps) == ("done", 18, 18)
    return blobs


def check_kohya(blobs: dict[str, bytes], tmp_path: Path, *, family: str, text_encoder: bool) -> Path:
    """Kohya format: key names, alpha, rank, header."""
    kohya = load(blobs["lora.safetensors"])
    assert all(KOHYA_KEY.match(key) for key in kohya), [k for k in kohya if not KOHYA_KEY.match(k)][:3]
    prefixes = {key.split("_", 2)[0] + "_" + key.split("_", 2)[1] for key in kohya}
    text_prefixes = {"lora_te"} if family == "sd15" else {"lora_te1", "lora_te2"}
    assert prefixes == ({"lora_unet"} | text_prefixes if text_encoder else {"lora_unet"})
    alphas = [float(t) for k, t in kohya.items() if k.endswith(".alpha")]
    assert alphas == [16.0] * len(alphas)
    assert len(alphas) * 3 == len(kohya)
    assert all(t.shape[0] == 16 for k, t in kohya.items() if k.endswith("lora_down.weight"))  # rank
    lora_path = tmp_path / "lora.safetensors"
    lora_path.write_bytes(blobs["lora.safetensors"])
    with safe_open(str(lora_path), "pt") as handle:
        header = handle.metadata()
    assert header["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("16", "16")
    assert header["ss_network_module"] == "networks.lora"
    assert (header["ss_epoch"], header["ss_steps"], header["ss_num_train_images"]) == ("2", "18", "12")
    assert header["modelspec.architecture"].endswith("/lora")
    assert header["ss_sd_model_version"] == "tiny-1"
    assert json.loads(header["ss_dataset_dirs"]) == {
        "1_anna": {"n_repeats": 1, "img_count": 6},
        "2_anna": {"n_repeats": 2, "img_count": 6},
    }
    tags = json.loads(header["ss_tag_frequency"])
    assert tags["2_anna"]["a person standing in a park"] == 2  # images 0 and 3 of that folder
    assert sum(tags["1_anna"].values()) == 12  # two tags per caption
    return lora_path


def check_loading_and_grid(
    blobs: dict[str, bytes], tmp_path: Path, *, model: Path, lora_path: Path, family: str
) -> None:
    """The diffusers file loads on the same pipeline and changes its output; the kohya file gives the same output."""
    pipeline_class: Any = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    pipe = pipeline_class.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    plain = render(pipe)
    diffusers_path = tmp_path / "lora.diffusers.safetensors"
    diffusers_path.write_bytes(blobs["lora.diffusers.safetensors"])
    pipe.load_lora_weights(diffusers_path)
    with_lora = render(pipe)
    assert np.abs(with_lora - plain).mean() > 1.0  # in 0..255 levels
    kohya_pipe = pipeline_class.from_pretrained(model)
    kohya_pipe.set_progress_bar_config(disable=True)
    kohya_pipe.load_lora_weights(lora_path)
    np.testing.assert_allclose(render(kohya_pipe), with_lora, atol=2.0)  # fp16 kohya weights: rounding only

    # The grid: rows no LoRA + 2 epochs, columns 2 CFG scales; the no-LoRA tile is the base model's picture.
    grid = Image.open(io.BytesIO(blobs["grid.png"])).convert("RGB")
    assert grid.size == (LABEL_WIDTH + 2 * 64, HEADER_HEIGHT + 3 * 64)
    assert json.loads(Image.open(io.BytesIO(blobs["grid.png"])).info["rows"]) == ["no LoRA", "epoch 1", "epoch 2"]

    def tile(row: int, col: int) -> np.ndarray:
        left, top = LABEL_WIDTH + col * 64, HEADER_HEIGHT + row * 64
        return np.asarray(grid.crop((left, top, left + 64, top + 64)), dtype=np.float32)

    np.testing.assert_allclose(tile(0, 1), plain, atol=2.0)
    np.testing.assert_allclose(tile(2, 1), with_lora, atol=2.0)  # the last epoch is the final LoRA
    assert np.abs(tile(1, 1) - tile(0, 1)).mean() > 0.5
    assert np.abs(tile(0, 0) - tile(0, 1)).mean() > 0.5  # CFG 1 and 4 differ
