"""Benchmark of the trainer: time per step, peak memory, the share of a step spent outside the UNet's forward and
backward, and epoch time with vs without cached latents. Prints a table with the targets of issue 4.

Run: ``python bench/trainer.py [--family sd15|sdxl] [--epochs 2] [--resolution 64]`` on the tiny models (CPU or GPU),
``python bench/trainer.py --real`` on a CUDA GPU for the real SD1.5 (512 px) and SDXL (1024 px) UNet architectures,
built from their public configs with random weights (speed and memory do not depend on weight values).
"""

# diffusers ships no type hints for its constructors.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from charlora.api.trainingjob import TrainingJobConfig
from charlora.devtools.datasets import write_kohya_dataset
from charlora.devtools.tiny_models import build_tiny_pipeline
from charlora_trainer.recipe import UNET_TARGETS, LoRARecipe

# The public diffusers configs of the two UNets (runwayml SD1.5 and stabilityai SDXL base 1.0), weights excluded.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "layers_per_block": 2,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}


class StepClock:
    """Accumulates the time spent in the UNet's forward (hooks) and in backward (a wrapper)."""

    def __init__(self, recipe: LoRARecipe) -> None:
        self.unet_seconds = 0.0
        self._started = 0.0
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def before(*_: Any) -> None:
            sync()
            self._started = time.perf_counter()

        def after(*_: Any) -> None:
            sync()
            self.unet_seconds += time.perf_counter() - self._started

        recipe.base.unet.register_forward_pre_hook(before)
        recipe.base.unet.register_forward_hook(after)
        backward: Callable[..., None] = recipe.accelerator.backward

        def timed_backward(loss: torch.Tensor, **kwargs: Any) -> None:
            before()
            backward(loss, **kwargs)
            after()

        recipe.accelerator.backward = timed_backward


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def tiny_run(args: argparse.Namespace, root: Path, *, cache_latents: bool) -> dict[str, float]:
    model = root / f"model-{args.family}"
    if not model.exists():
        build_tiny_pipeline(args.family, model)
    dataset = root / "dataset"
    if not dataset.exists():
        write_kohya_dataset(dataset, folders={"2_anna": 8, "1_anna": 8}, size=(args.resolution, args.resolution))
    config = TrainingJobConfig.model_validate(
        {
            "namespace": "bench",
            "character": "anna",
            "version": "v1",
            "baseModel": {"family": args.family, "uri": str(model), "version": "tiny"},
            "dataset": {"uri": dataset.as_uri()},
            "training": {
                "resolution": args.resolution,
                "epochs": args.epochs,
                "batchSize": args.batch_size,
                "mixedPrecision": "bf16" if torch.cuda.is_available() else "no",
                "cacheLatents": cache_latents,
                "buckets": {"minResolution": 64},
                "gradientCheckpointing": True,
            },
            "outputUri": (root / f"out-{cache_latents}").as_uri(),
            "checkpointEverySteps": 10_000,
            "progressEverySeconds": 5,
        }
    )
    shutil.rmtree(root / f"out-{cache_latents}", ignore_errors=True)
    shutil.rmtree(root / f"work-{cache_latents}", ignore_errors=True)
    recipe = LoRARecipe(config, workdir=root / f"work-{cache_latents}", log=lambda _: None)
    started = time.perf_counter()
    recipe.setup()
    setup_seconds = time.perf_counter() - started
    clock = StepClock(recipe)
    started = time.perf_counter()
    recipe.train()
    train_seconds = time.perf_counter() - started
    return {
        "setup_s": setup_seconds,
        "step_s": statistics.median(recipe.step_seconds),
        "epoch_s": train_seconds / recipe.total_epochs,
        "outside_unet_share": 1 - clock.unet_seconds / train_seconds,
        "peak_mib": peak_memory_mib(),
        "steps": recipe.total_steps,
    }


def real_unet_run(name: str, unet_config: dict[str, Any], *, latent: int, batch: int, steps: int) -> dict[str, float]:
    """s/it and peak VRAM of LoRA rank 32 training on cached latents/embeddings, bf16, gradient checkpointing."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    unet: Any = UNet2DConditionModel(**unet_config)
    unet.to("cuda", dtype=torch.bfloat16)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    for parameter in unet.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    hidden = torch.randn(batch, 77, unet_config["cross_attention_dim"], device="cuda", dtype=torch.bfloat16)
    added = None
    if name == "sdxl":
        added = {
            "text_embeds": torch.randn(batch, 1280, device="cuda", dtype=torch.bfloat16),
            "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device="cuda", dtype=torch.bfloat16),
        }
    timings = []
    for index in range(steps + 2):
        latents = torch.randn(batch, 4, latent, latent, device="cuda", dtype=torch.bfloat16)
        timesteps = torch.randint(0, 1000, (batch,), device="cuda")
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            prediction = unet(latents, timesteps, hidden, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), latents.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if index >= 2:  # the first steps pay for kernel selection
            timings.append(time.perf_counter() - started)
    del unet, optimizer
    return {"s_per_it": sum(timings) / len(timings), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sd15", "sdxl"], default="sdxl")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--real", action="store_true", help="real SD1.5/SDXL UNet architectures (needs CUDA)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="tiny mode: keep the best of this many runs")
    args = parser.parse_args()
    if args.real:
        if not torch.cuda.is_available():
            sys.exit("--real needs a CUDA GPU: not measured here")
        print(
            f"{'model':<8} {'batch':>5} {'s/it':>8} {'peak GiB':>9}  targets (H100): SDXL b1 <= 0.5 s/it, b4 <= 12 GB;"
        )
        print(f"{'':<8} {'':>5} {'':>8} {'':>9}  SD1.5 b4 <= 6 GB  ({torch.cuda.get_device_name()})")
        for name, unet_config, latent in (("sd15", SD15_UNET, 64), ("sdxl", SDXL_UNET, 128)):
            for batch in (1, 4):
                result = real_unet_run(name, unet_config, latent=latent, batch=batch, steps=args.steps)
                print(f"{name:<8} {batch:>5} {result['s_per_it']:>8.3f} {result['peak_gib']:>9.2f}")
        return
    with tempfile.TemporaryDirectory(prefix="charlora-bench-") as scratch:
        root = Path(scratch)
        tiny_run(args, root, cache_latents=True)  # warm-up: first calls pay for allocation and kernel selection
        # The best of a few runs: other jobs on a shared machine only ever add time.
        runs = [(tiny_run(args, root, cache_latents=False), tiny_run(args, root, cache_latents=True))]
        runs += [
            (tiny_run(args, root, cache_latents=False), tiny_run(args, root, cache_latents=True))
            for _ in range(args.repeats - 1)
        ]
        uncached = {key: min(run[0][key] for run in runs) for key in runs[0][0]}
        cached = {key: min(run[1][key] for run in runs) for key in runs[0][1]}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"tiny {args.family}, {args.resolution} px, batch {args.batch_size}, {cached['steps']:.0f} steps on {device}, "
        f"best of {args.repeats}"
    )
    print(f"{'metric':<44} {'value':>10} {'target':>10}")
    rows = [
        ("median optimizer step, cached latents (s)", f"{cached['step_s']:.3f}", ""),
        ("median optimizer step, uncached latents (s)", f"{uncached['step_s']:.3f}", ""),
        ("epoch time, cached latents (s)", f"{cached['epoch_s']:.2f}", ""),
        ("epoch time, uncached latents (s)", f"{uncached['epoch_s']:.2f}", ""),
        ("setup incl. caching latents (s)", f"{cached['setup_s']:.2f}", ""),
        ("peak memory (MiB)", f"{max(cached['peak_mib'], uncached['peak_mib']):.0f}", ""),
        ("share of step time outside UNet fwd/bwd", f"{cached['outside_unet_share']:.1%}", "<= 10%"),
        ("epoch time uncached / cached latents", f"{uncached['epoch_s'] / cached['epoch_s']:.2f}x", ">= 1.3x"),
    ]
    for metric, value, target in rows:
        print(f"{metric:<44} {value:>10} {target:>10}")


if __name__ == "__main__":
    main()
