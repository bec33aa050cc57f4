"""The tiny pipelines: both families build, save, reload and render a 64 px image; weights depend only on the seed."""
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from charlora.devtools.tiny_models import TINY_RESOLUTION, build_tiny_pipeline


def _unet_digest(path: Path) -> str:
    return hashlib.sha256((path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_pipeline_reloads_and_renders(family: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(f"tiny_{family}")
    pipeline_class = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    pipe = pipeline_class.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == TINY_RESOLUTION

    def render(prompt: str) -> np.ndarray:
        generator = torch.Generator().manual_seed(7)
        result = pipe(prompt, num_inference_steps=2, generator=generator, output_type="np")
        return np.asarray(result.images)

    first, again, other = render("a cat"), render("a cat"), render("a dog on a red sofa")
    assert first.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(first).all()
    assert first.std() > 1e-3  # not a flat image
    np.testing.assert_array_equal(first, again)  # fixed seed, same output
    assert np.abs(first - other).max() > 1e-4  # the prompt reaches the UNet through the tokenizer


def test_tiny_weights_depend_only_on_seed(tiny_sd15: Path, tmp_path: Path) -> None:
    same = build_tiny_pipeline("sd15", tmp_path / "same", seed=0)
    other = build_tiny_pipeline("sd15", tmp_path / "other", seed=1)
    assert _unet_digest(same) == _unet_digest(tiny_sd15)
    assert _unet_digest(other) != _unet_digest(tiny_sd15)
    assert not list(same.glob(".*")), "no scratch files left in the saved pipeline"
