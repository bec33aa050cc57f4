"""Training on tiny real models: the loss falls on a fixed batch, and each option does what it says, in numbers."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from charlora.api.characterlora import BucketSpec
from charlora_trainer import bucketing
from charlora_trainer.recipe import LoRARecipe

MakeRecipe = Callable[..., LoRARecipe]


def lora_vector(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for n, p in module.named_parameters() if "lora_" in n])


@pytest.mark.parametrize(
    ("family", "text_encoder"), [("sd15", False), ("sdxl", True)], ids=["sd15-unet", "sdxl-unet+te"]
)
def test_loss_decreases_on_a_fixed_batch(make_recipe: MakeRecipe, family: str, text_encoder: bool) -> None:
    recipe = make_recipe(
        family, scheduler="constant", unetLearningRate="1e-3", trainTextEncoder=text_encoder, optimizer="AdamW"
    )
    batch = recipe.make_batch([0, 1, 2, 3], step=0)
    assert batch.latents is not None
    assert batch.latents.shape == (4, 4, 8, 8)
    before = {prefix: lora_vector(module) for prefix, module in recipe.trained.items()}
    losses = [recipe.optimizer_step(batch, torch.Generator().manual_seed(0)) for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.98 * losses[0]
    expected = ["lora_unet", "lora_te1", "lora_te2"] if text_encoder else ["lora_unet"]
    assert list(recipe.trained) == expected
    for prefix, module in recipe.trained.items():
        assert not torch.equal(before[prefix], lora_vector(module)), f"{prefix} LoRA did not train"


def test_same_seed_same_losses(make_recipe: MakeRecipe) -> None:
    def run() -> list[float]:
        recipe = make_recipe("sd15", maxSteps=3, captionDropoutRate="0.3", shuffleCaptions=True, keepTokens=1)
        recipe.train()
        assert recipe.step == 3
        return [recipe.last_loss or 0.0]

    torch.testing.assert_close(run(), run())


def test_min_snr_gamma_weighting(make_recipe: MakeRecipe) -> None:
    recipe = make_recipe("sd15")
    batch = recipe.make_batch([0, 1, 2, 3, 4, 5], step=0)

    def loss_with(gamma: str | None) -> torch.Tensor:
        recipe.spec = recipe.spec.model_copy(update={"min_snr_gamma": gamma})
        with torch.no_grad():
            return recipe._loss_step(batch, torch.Generator().manual_seed(3))

    plain = loss_with(None)
    torch.testing.assert_close(loss_with("1e9"), plain)  # min(snr, huge) / snr == 1
    assert loss_with("0.5") < plain  # low-noise timesteps (snr > gamma) are weighted down


def test_noise_offset_changes_the_loss(make_recipe: MakeRecipe) -> None:
    recipe = make_recipe("sd15")
    batch = recipe.make_batch([0, 1], step=0)

    def loss_with(offset: str | None) -> torch.Tensor:
        recipe.spec = recipe.spec.model_copy(update={"noise_offset": offset})
        with torch.no_grad():
            return recipe._loss_step(batch, torch.Generator().manual_seed(3))

    assert loss_with(None) != loss_with("0.5")


def test_uncached_latents_read_pixels_and_leave_the_dataset_alone(make_recipe: MakeRecipe, local_dataset: Path) -> None:
    before = sorted(p.relative_to(local_dataset) for p in local_dataset.rglob("*"))
    recipe = make_recipe("sdxl", cacheLatents=False)
    assert recipe.latents is None
    batch = recipe.make_batch([0, 1], step=0)
    assert batch.pixels is not None
    assert batch.pixels.shape == (2, 3, 64, 64)
    assert float(batch.pixels.min()) >= -1.0
    assert float(batch.pixels.max()) <= 1.0
    loss = recipe.optimizer_step(batch)
    assert loss == pytest.approx(loss)  # finite: NaN != NaN
    assert 0 < loss < 10
    cached = make_recipe("sd15", cacheLatents=True)
    assert cached.latents is not None
    assert len(cached.latents) == 12
    assert sorted(p.relative_to(local_dataset) for p in local_dataset.rglob("*")) == before


def test_optimizers(make_recipe: MakeRecipe) -> None:
    logs: list[str] = []
    fallback = make_recipe("sd15", logs=logs, optimizer="AdamW8bit")
    assert type(getattr(fallback.optimizer, "optimizer", fallback.optimizer)) is torch.optim.AdamW
    assert any("AdamW8bit needs" in line and "using plain AdamW" in line for line in logs), logs
    prodigy = make_recipe("sd15", optimizer="Prodigy", unetLearningRate="1")
    assert type(getattr(prodigy.optimizer, "optimizer", prodigy.optimizer)).__name__ == "Prodigy"
    batch = prodigy.make_batch([0, 1], step=0)
    before = lora_vector(prodigy.base.unet)
    losses = [prodigy.optimizer_step(batch, torch.Generator().manual_seed(0)) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, lora_vector(prodigy.base.unet))


def test_warmup_then_schedule(make_recipe: MakeRecipe) -> None:
    recipe = make_recipe("sd15", maxSteps=10, warmupSteps=4, scheduler="cosine", unetLearningRate="1e-3", batchSize=2)
    assert recipe.total_steps == 10
    assert recipe.total_epochs == 2  # 9 steps per epoch
    rates = []
    for _ in range(10):
        rates.append(recipe.optimizer.param_groups[0]["lr"])
        recipe.lr_scheduler.step()
    torch.testing.assert_close(rates[:5], [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert rates[5] > rates[7] > rates[9] > 0  # cosine decay after warmup


# ---------------------------------------------------------------- pure helpers


def test_buckets_fit_the_area_and_the_unet() -> None:
    buckets = bucketing.make_buckets(1024, BucketSpec(), align=64)
    assert bucketing.Bucket(1024, 1024) in buckets
    assert all(b.width % 64 == 0 and b.height % 64 == 0 for b in buckets)
    assert all(b.width * b.height <= 1024 * 1024 for b in buckets)
    assert bucketing.assign_bucket(800, 1200, buckets) == bucketing.Bucket(832, 1216)
    assert bucketing.assign_bucket(1200, 800, buckets) == bucketing.Bucket(1216, 832)
    assert bucketing.make_buckets(512, BucketSpec(enabled=False), align=64) == [bucketing.Bucket(512, 512)]


def test_fifteen_odd_images_never_shrink_to_zero() -> None:
    """15 images in 15 different shapes at batch size 4: every sample is trained, partial batches included."""
    buckets = bucketing.make_buckets(512, BucketSpec(), align=64)
    shapes = [(300 + 97 * i, 900 - 41 * i) for i in range(15)]
    assigned = [bucketing.assign_bucket(w, h, buckets) for w, h in shapes]
    assert len(set(assigned)) > 4  # many buckets with fewer images than the batch size
    repeats = [3] * 15
    batches = bucketing.epoch_batches(assigned, repeats, batch_size=4, seed=1, epoch=0)
    assert sorted(i for batch in batches for i in batch) == sorted(list(range(15)) * 3)
    assert all(len({assigned[i] for i in batch}) == 1 for batch in batches)
    assert len(batches) == bucketing.steps_per_epoch(assigned, repeats, batch_size=4)
    assert bucketing.epoch_batches(assigned, repeats, batch_size=4, seed=1, epoch=0) == batches
    assert bucketing.epoch_batches(assigned, repeats, batch_size=4, seed=1, epoch=1) != batches


def test_caption_shuffle_keeps_tokens_and_dropout_empties() -> None:
    caption = "anna, red dress, park, smiling, sunny"
    rng = random.Random(0)
    shuffled = {bucketing.augment_caption(caption, rng, dropout_rate=0, shuffle=True, keep_tokens=1) for _ in range(30)}
    assert len(shuffled) > 5
    assert all(c.startswith("anna, ") and sorted(c.split(", ")) == sorted(caption.split(", ")) for c in shuffled)
    dropped = [
        bucketing.augment_caption(caption, rng, dropout_rate=0.5, shuffle=False, keep_tokens=0) for _ in range(400)
    ]
    assert 150 < dropped.count("") < 250
    assert set(dropped) == {"", caption}


def test_phone_photos_are_trained_upright(tmp_path: Path) -> None:
    """A portrait photo stored landscape with EXIF orientation 6 is bucketed and cropped as the portrait it is."""
    from PIL import Image  # noqa: PLC0415 - only this test builds pictures by hand

    from charlora_trainer.recipe import Sample, _crop_of, load_pixels, oriented_size  # noqa: PLC0415

    upright = Image.new("RGB", (64, 128), "white")
    upright.paste((255, 0, 0), (0, 0, 64, 32))  # red band at the top of the portrait
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 128 x 64, band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    with Image.open(path) as image:
        assert image.size == (128, 64)
        assert oriented_size(image) == (64, 128)
    bucket = bucketing.Bucket(64, 128)
    sample = Sample(path, "x", 1, bucket, original_size=(128, 64), crop=_crop_of((64, 128), bucket))
    pixels = load_pixels(sample)
    assert pixels.shape == (3, 128, 64)
    top, bottom = pixels[:, :24].mean(dim=(1, 2)), pixels[:, -24:].mean(dim=(1, 2))
    torch.testing.assert_close(top, torch.tensor([1.0, -1.0, -1.0]), atol=0.1, rtol=0)  # red on top
    torch.testing.assert_close(bottom, torch.tensor([1.0, 1.0, 1.0]), atol=0.1, rtol=0)  # white below
