"""Mixed precision on a CUDA GPU: fp16/bf16 base weights, float32 LoRA weights, the SDXL VAE in float32.

Skipped without CUDA (no GPU in CI); run with ``pytest -m gpu tests/trainer`` on a GPU machine.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from charlora_trainer.recipe import LoRARecipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize(("family", "precision"), [("sdxl", "fp16"), ("sd15", "bf16"), ("sdxl", "bf16")])
def test_mixed_precision_trains_with_finite_losses(
    make_recipe: Callable[..., LoRARecipe], family: str, precision: str
) -> None:
    recipe = make_recipe(family, mixedPrecision=precision, unetLearningRate="1e-3", scheduler="constant")
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert recipe.base.unet.dtype == half
    assert recipe.base.vae.dtype == (torch.float32 if family == "sdxl" else half)
    assert all(p.dtype == torch.float32 for p in recipe.base.unet.parameters() if p.requires_grad)
    # Cached latents and embeddings: the VAE and the frozen text encoders wait on the CPU until the grid.
    assert recipe.base.vae.device.type == "cpu"
    assert all(e.device.type == "cpu" for e in recipe.base.text_encoders)
    batch = recipe.make_batch([0, 1, 2, 3], step=0)
    assert batch.latents is not None
    assert torch.isfinite(batch.latents).all()
    losses = [recipe.optimizer_step(batch, torch.Generator().manual_seed(0)) for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_adamw8bit_on_cuda(make_recipe: Callable[..., LoRARecipe]) -> None:
    pytest.importorskip("bitsandbytes")
    recipe = make_recipe("sd15", optimizer="AdamW8bit", mixedPrecision="bf16")
    inner = getattr(recipe.optimizer, "optimizer", recipe.optimizer)
    assert type(inner).__name__ == "AdamW8bit"
    loss = recipe.optimizer_step(recipe.make_batch([0, 1], step=0))
    assert loss == pytest.approx(loss)  # finite: NaN != NaN
