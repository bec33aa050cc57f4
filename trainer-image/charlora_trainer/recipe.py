"""The LoRA training recipe: ``setup()`` (lint, base model, adapters, caches, resume) -> ``train()`` -> ``save()``.

One object holds the run's state; nothing lives at module level. The loss is computed in ``_loss_step(batch)``;
devices and mixed precision go through accelerate.
"""

# diffusers, peft and transformers ship few type hints.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator  # type: ignore[import-untyped]
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from charlora import artifacts
from charlora.api.trainingjob import TrainingJobConfig
from charlora.storing import NotFound, ObjectStore, S3Settings, open_store
from charlora_trainer import bucketing, kohya
from charlora_trainer.datasets import Dataset, fetch_dataset, scan_dataset
from charlora_trainer.failing import BadInput
from charlora_trainer.linting import LintReport, lint_dataset
from charlora_trainer.models import load_base_model, locate_base_model
from charlora_trainer.progressing import ProgressWriter

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
MAX_GRAD_NORM = 1.0
LATEST_CHECKPOINT = f"{artifacts.CHECKPOINTS_DIR}latest.json"


@dataclass(frozen=True)
class Sample:
    """One dataset image as the trainer sees it: its bucket, caption, and (once cached) its latents."""

    image: Path
    caption: str
    repeats: int
    bucket: bucketing.Bucket
    original_size: tuple[int, int]  # (height, width)
    crop: tuple[int, int]  # (top, left) in the resized image


@dataclass
class Batch:
    indices: list[int]
    captions: list[str]
    latents: torch.Tensor | None = None
    pixels: torch.Tensor | None = None


# EXIF orientations that turn the stored picture by 90 degrees (phone photos): width and height swap.
QUARTER_TURNS = frozenset({5, 6, 7, 8})
EXIF_ORIENTATION = 0x0112


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) as the picture is meant to be seen, without decoding it."""
    width, height = image.size
    return (height, width) if image.getexif().get(EXIF_ORIENTATION) in QUARTER_TURNS else (width, height)


def load_pixels(sample: Sample) -> torch.Tensor:
    """The image upright, resized to cover its bucket and centre-cropped, as a (3, H, W) tensor in [-1, 1]."""
    width, height = sample.bucket.width, sample.bucket.height
    with Image.open(sample.image) as source:
        image = ImageOps.exif_transpose(source).convert("RGB")
    scale = max(width / image.width, height / image.height)
    resized = image.resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.Resampling.LANCZOS
    )
    top, left = sample.crop
    cropped = resized.crop((left, top, left + width, top + height))
    data = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


def _crop_of(size: tuple[int, int], bucket: bucketing.Bucket) -> tuple[int, int]:
    width, height = size
    scale = max(bucket.width / width, bucket.height / height)
    resized_w, resized_h = max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))
    return (resized_h - bucket.height) // 2, (resized_w - bucket.width) // 2


class BackgroundUploads:
    """One upload thread, so the GPU trains on while epoch files and resume state go to the store (in order).

    A failed upload is raised at the next ``submit`` or at ``wait``: the run fails (and is retried) instead of
    finishing with a hole.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="charlora-upload")
        self._pending: list[Future[None]] = []

    def submit(self, upload: Callable[[], None]) -> None:
        for done in [f for f in self._pending if f.done()]:
            self._pending.remove(done)
            done.result()
        self._pending.append(self._pool.submit(upload))

    def wait(self) -> None:
        while self._pending:
            self._pending.pop(0).result()


class LoRARecipe:
    """Trains one character LoRA version as configured by a :class:`TrainingJobConfig`."""

    def __init__(
        self,
        config: TrainingJobConfig,
        *,
        workdir: Path,
        settings: S3Settings | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.spec = config.training
        self.family = config.base_model.family
        self.workdir = workdir
        self.settings = settings
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.output_uri = config.output_uri if config.output_uri.endswith("/") else config.output_uri + "/"
        self.store: ObjectStore = open_store(self.output_uri, settings)
        self.out_dir = workdir / "out"
        self.resolution = self.spec.resolved_resolution(self.family)
        self.progress = ProgressWriter(self.store, self.output_uri + artifacts.PROGRESS, config.progress_every_seconds)
        self.step = 0
        self.last_loss: float | None = None
        self.saved_epochs: list[int] = []
        self.generator = torch.Generator()
        self.step_seconds: list[float] = []
        self.resumed_from: int | None = None
        self._batches: dict[int, list[list[int]]] = {}  # the current epoch's batch order
        self.uploads = BackgroundUploads()

    # ---------------------------------------------------------------- setup

    def already_published(self) -> bool:
        """True when manifest.json exists: a pod restarted after success must not retrain over a finished version."""
        return self.store.exists(self.output_uri + artifacts.MANIFEST)

    def setup(self) -> None:
        """Lint the dataset (before any GPU work), load the base model, add adapters, fill caches, resume."""
        self._setup_accelerator()
        if not self.store.exists(self.progress.uri):  # a resumed pod keeps showing the last pod's step meanwhile
            self.progress.write(step=0, total_steps=0, epoch=0, phase="preparing", force=True)
        self.dataset = self._lint()
        model_path = locate_base_model(
            self.config.base_model, cache_dir=self.workdir / "models", settings=self.settings
        )
        self.base = load_base_model(model_path, self.family)
        self._place_models()
        self._add_adapters()
        self.samples = self._build_samples(self.dataset)
        self.latents = self._cache_latents() if self.spec.cache_latents else None
        self.text_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = (
            {} if not self.spec.train_text_encoder and not self.spec.shuffle_captions else None
        )
        if self.text_cache is not None:
            self._cache_text()
        self._offload_frozen()
        self._setup_optimization()
        self._resume()

    def _lint(self) -> Dataset:
        root = fetch_dataset(self.config.dataset, workdir=self.workdir, settings=self.settings)
        dataset = scan_dataset(root, self.config.dataset)
        report: LintReport = lint_dataset(
            dataset,
            resolution=self.resolution,
            min_images=self.config.dataset.min_images,
            character_token=self.config.dataset.character_token or self.config.character,
        )
        self._publish_bytes(artifacts.LINT_REPORT, report.model_dump_json(by_alias=True, indent=2).encode())
        for warning in report.warnings:
            self.log(f"Dataset lint warning {warning.code}: {warning.message}")
        if not report.ok:
            raise BadInput(report.failure_message())
        self.log(f"Dataset passed the lint: {report.images} images, {report.samples_per_epoch} samples per epoch")
        return dataset

    def _setup_accelerator(self) -> None:
        precision = self.spec.mixed_precision
        if precision != "no" and not torch.cuda.is_available():
            self.log(f"No CUDA device: training in float32 instead of {precision}")
            precision = "no"
        self.accelerator = Accelerator(mixed_precision=precision)
        self.device = self.accelerator.device
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        # With several GPUs (accelerate launch) every process trains; only the main one writes to the store.
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.is_main = bool(self.accelerator.is_main_process)
        self.progress.enabled = self.is_main
        if not self.is_main:
            self.log = lambda _: None  # one process tells the story

    def _place_models(self) -> None:
        base = self.base
        base.unet.to(self.device, dtype=self.weight_dtype)
        # The SDXL VAE overflows in fp16 (NaN latents): it always runs in float32.
        vae_dtype = torch.float32 if self.family == "sdxl" else self.weight_dtype
        base.vae.to(self.device, dtype=vae_dtype)
        for encoder in base.text_encoders:
            encoder.to(self.device, dtype=self.weight_dtype)

    def _add_adapters(self) -> None:
        base, spec = self.base, self.spec
        # The LoRA A matrices start random: seed them, so equal configs give equal runs.
        torch.manual_seed(spec.seed)
        for module in [base.unet, base.vae, *base.text_encoders]:
            module.requires_grad_(False)
        base.unet.add_adapter(
            LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
        )
        self.trained: dict[str, Any] = {"lora_unet": base.unet}
        if spec.train_text_encoder:
            for prefix, encoder in zip(
                kohya.TEXT_ENCODER_PREFIXES[len(base.text_encoders)], base.text_encoders, strict=True
            ):
                encoder.add_adapter(
                    LoraConfig(
                        r=spec.rank,
                        lora_alpha=spec.alpha,
                        init_lora_weights="gaussian",
                        target_modules=TEXT_ENCODER_TARGETS,
                    )
                )
                self.trained[prefix] = encoder
        # LoRA weights train in float32 even when the frozen base runs in half precision.
        for module in self.trained.values():
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        if spec.gradient_checkpointing:
            base.unet.enable_gradient_checkpointing()
            if spec.train_text_encoder:
                for encoder in base.text_encoders:
                    encoder.gradient_checkpointing_enable()
        # peft module names per component: needed to read a kohya file back (grid rows of earlier epochs).
        self.module_names = {
            prefix: sorted(
                k.removesuffix(kohya.PEFT_DOWN) for k in self._peft_state(module) if k.endswith(kohya.PEFT_DOWN)
            )
            for prefix, module in self.trained.items()
        }

    def _build_samples(self, dataset: Dataset) -> list[Sample]:
        buckets = bucketing.make_buckets(self.resolution, self.spec.buckets, align=self.base.align)
        samples = []
        for item in dataset.items:
            with Image.open(item.image) as image:
                size = oriented_size(image)
            bucket = bucketing.assign_bucket(*size, buckets)
            samples.append(
                Sample(
                    image=item.image,
                    caption=item.caption or "",
                    repeats=item.repeats,
                    bucket=bucket,
                    original_size=(size[1], size[0]),
                    crop=_crop_of(size, bucket),
                )
            )
        return samples

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vae = self.base.vae
        # Never under autocast: the SDXL VAE must really run in float32.
        with torch.autocast(self.device.type, enabled=False):
            distribution = vae.encode(pixels.to(self.device, dtype=vae.dtype)).latent_dist
        noise = torch.randn(distribution.mean.shape, generator=generator, dtype=torch.float32).to(self.device)
        latents: torch.Tensor = distribution.mean.float() + distribution.std.float() * noise
        return latents * float(vae.config.scaling_factor)

    def _cache_latents(self) -> list[torch.Tensor]:
        """Every image through the VAE once (in memory, one tensor per image): the dataset source is never touched."""
        generator = torch.Generator().manual_seed(self.spec.seed)
        started = time.monotonic()
        cached = [self._encode_pixels(load_pixels(s)[None], generator)[0].cpu() for s in self.samples]
        self.log(f"Cached the latents of {len(cached)} images in {time.monotonic() - started:.1f} s")
        return cached

    @torch.no_grad()
    def _cache_text(self) -> None:
        """Every caption (and the empty one of caption dropout) through the frozen text encoder(s) once."""
        captions = sorted(
            {s.caption for s in self.samples} | ({""} if float(self.spec.caption_dropout_rate) else set())
        )
        for start in range(0, len(captions), 16):
            with self.accelerator.autocast():
                self._encode_text(captions[start : start + 16])

    def _offload_frozen(self) -> None:
        """Cached latents and embeddings make the VAE and frozen text encoders idle until the grid: free the GPU."""
        if self.device.type != "cuda":
            return
        idle = ([self.base.vae] if self.latents is not None else []) + (
            self.base.text_encoders if self.text_cache is not None else []
        )
        for module in idle:
            module.to("cpu")
        torch.cuda.empty_cache()

    def restore_frozen(self) -> None:
        """Back onto the device for sampling (the grid)."""
        for module in [self.base.vae, *self.base.text_encoders]:
            module.to(self.device)

    def _setup_optimization(self) -> None:
        spec = self.spec
        unet_lr = float(spec.unet_learning_rate)
        text_lr = float(spec.text_encoder_learning_rate or spec.unet_learning_rate)
        groups: list[dict[str, Any]] = [
            {
                "params": [p for p in module.parameters() if p.requires_grad],
                "lr": unet_lr if prefix == "lora_unet" else text_lr,
            }
            for prefix, module in self.trained.items()
        ]
        self.optimizer = self._make_optimizer(groups)
        repeats = [s.repeats for s in self.samples]
        buckets = [s.bucket for s in self.samples]
        self.batches_per_epoch = bucketing.steps_per_epoch(buckets, repeats, batch_size=spec.batch_size)
        # Each process takes its own batch of a step: an epoch has 1/world as many steps.
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.world)
        epochs = spec.resolved_epochs()
        self.total_steps = spec.max_steps if spec.max_steps is not None else (epochs or 1) * self.steps_per_epoch
        self.total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        schedule = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[spec.scheduler]
        self.lr_scheduler = get_scheduler(
            schedule,
            optimizer=self.optimizer,
            # accelerate steps a prepared scheduler once per process for every optimizer step
            num_warmup_steps=spec.warmup_steps * self.world,
            num_training_steps=self.total_steps * self.world,
        )
        modules = list(self.trained.values())
        prepared = self.accelerator.prepare(*modules, self.optimizer, self.lr_scheduler)
        # Forward through the prepared (with several GPUs: DDP-wrapped) modules, so gradients are synchronised.
        self.trained = dict(zip(self.trained, prepared[:-2], strict=True))
        self.optimizer, self.lr_scheduler = prepared[-2], prepared[-1]
        self.log(
            f"Training {self.total_steps} steps ({self.total_epochs} epochs of {self.steps_per_epoch}) with "
            f"{sum(p.numel() for g in groups for p in g['params'])} LoRA parameters"
        )

    def _make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        name = self.spec.optimizer
        if name == "AdamW8bit":
            try:
                import bitsandbytes  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - optional

                if torch.cuda.is_available():
                    optimizer: torch.optim.Optimizer = bitsandbytes.optim.AdamW8bit(groups, weight_decay=1e-2)
                    return optimizer
                self.log("AdamW8bit needs a CUDA device: using plain AdamW")
            except ImportError:
                self.log("AdamW8bit needs bitsandbytes, which is not installed: using plain AdamW")
        if name == "Prodigy":
            from prodigyopt import Prodigy  # type: ignore[import-untyped]  # noqa: PLC0415 - only Prodigy needs it

            if any(group["lr"] < 0.1 for group in groups):
                # Prodigy estimates the step size itself; its learning rate is a multiplier, normally 1.
                self.log("Prodigy usually wants a learning rate of about 1; the configured rates scale its steps down")
            prodigy: torch.optim.Optimizer = Prodigy(groups, weight_decay=1e-2, safeguard_warmup=True)
            return prodigy
        return torch.optim.AdamW(groups, weight_decay=1e-2)

    # ---------------------------------------------------------------- batches and loss

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        cache = self._batches
        if epoch not in cache:
            cache.clear()
            cache[epoch] = bucketing.epoch_batches(
                [s.bucket for s in self.samples],
                [s.repeats for s in self.samples],
                batch_size=self.spec.batch_size,
                seed=self.spec.seed,
                epoch=epoch,
            )
        return cache[epoch]

    def make_batch(self, indices: list[int], *, step: int) -> Batch:
        """The batch for ``indices``: captions augmented with a per-step RNG, latents from the cache or pixels."""
        rng = random.Random(f"{self.spec.seed}:captions:{step}")
        captions = [
            bucketing.augment_caption(
                self.samples[i].caption,
                rng,
                dropout_rate=float(self.spec.caption_dropout_rate),
                shuffle=self.spec.shuffle_captions,
                keep_tokens=self.spec.keep_tokens,
            )
            for i in indices
        ]
        if self.latents is not None:
            return Batch(indices, captions, latents=torch.stack([self.latents[i] for i in indices]))
        return Batch(indices, captions, pixels=torch.stack([load_pixels(self.samples[i]) for i in indices]))

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled embedding or None): SDXL concatenates both encoders' penultimate layers."""
        if self.text_cache is not None and all(c in self.text_cache for c in captions):
            hidden = torch.stack([self.text_cache[c][0] for c in captions]).to(self.device)
            pooled_parts = [self.text_cache[c][1] for c in captions]
            pooled = torch.stack(pooled_parts).to(self.device) if pooled_parts[0] is not None else None  # type: ignore[arg-type]
            return hidden, pooled
        hidden_states, pooled = [], None
        with torch.set_grad_enabled(self.spec.train_text_encoder and torch.is_grad_enabled()):
            prefixes = kohya.TEXT_ENCODER_PREFIXES[len(self.base.text_encoders)]
            for index, (tokenizer, prefix) in enumerate(zip(self.base.tokenizers, prefixes, strict=True)):
                encoder = self.trained.get(prefix, self.base.text_encoders[index])
                ids = tokenizer(
                    captions,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids.to(self.device)
                output = encoder(ids, output_hidden_states=True)
                if self.family == "sdxl":
                    hidden_states.append(output.hidden_states[-2])
                    pooled = output[0] if index == len(prefixes) - 1 else pooled
                elif self.spec.clip_skip and self.spec.clip_skip > 1:
                    inner = encoder.module if hasattr(encoder, "module") else encoder
                    hidden_states.append(inner.text_model.final_layer_norm(output.hidden_states[-self.spec.clip_skip]))
                else:
                    hidden_states.append(output.last_hidden_state)
        hidden = torch.cat(hidden_states, dim=-1)
        if self.text_cache is not None:
            for index, caption in enumerate(captions):
                self.text_cache[caption] = (
                    hidden[index].detach().cpu(),
                    pooled[index].detach().cpu() if pooled is not None else None,
                )
        return hidden, pooled

    def _time_ids(self, batch: Batch) -> torch.Tensor:
        rows = []
        for index in batch.indices:
            sample = self.samples[index]
            rows.append([*sample.original_size, *sample.crop, sample.bucket.height, sample.bucket.width])
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def _loss_step(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """The denoising loss of one batch (min-SNR weighted, noise offset), noise drawn from ``generator``."""
        generator = generator or self.generator
        if batch.latents is not None:
            latents = batch.latents.to(self.device, dtype=torch.float32)
        else:
            assert batch.pixels is not None
            latents = self._encode_pixels(batch.pixels, generator)
        scheduler = self.base.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        if self.spec.noise_offset and float(self.spec.noise_offset) > 0:
            offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator)
            noise = noise + float(self.spec.noise_offset) * offset.to(self.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator).to(
            self.device
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with self.accelerator.autocast():  # the text encoders too: frozen half weights, float32 LoRA weights
            hidden, pooled = self._encode_text(batch.captions)
        added = None
        if self.family == "sdxl":
            added = {"text_embeds": pooled.to(self.weight_dtype), "time_ids": self._time_ids(batch)}  # type: ignore[union-attr]
        with self.accelerator.autocast():
            prediction = self.trained["lora_unet"](
                noisy.to(self.weight_dtype),
                timesteps,
                hidden.to(self.weight_dtype),
                added_cond_kwargs=added,
            ).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        loss = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
        if self.spec.min_snr_gamma:
            snr = compute_snr(scheduler, timesteps)
            clipped = snr.clamp(max=float(self.spec.min_snr_gamma))
            weight = clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr
            loss = loss * weight
        return loss.mean()

    def optimizer_step(self, batch: Batch, generator: torch.Generator | None = None) -> float:
        """One optimizer step on ``batch``; returns its loss."""
        for module in self.trained.values():
            module.train()
        loss = self._loss_step(batch, generator)
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ---------------------------------------------------------------- train

    def train(self) -> None:
        """Steps until the total, saving every Nth epoch's LoRA and resume state every N steps."""
        started, start_step = time.monotonic(), self.step
        while self.step < self.total_steps:
            epoch, position = divmod(self.step, self.steps_per_epoch)
            batches = self._epoch_batches(epoch)
            # The last step of an epoch may have fewer batches than processes: those re-use one (kept in lockstep).
            indices = batches[(position * self.world + self.rank) % len(batches)]
            batch = self.make_batch(indices, step=self.step)
            self.generator.manual_seed((self.spec.seed * 1_000_003 + self.step) * self.world + self.rank)
            step_started = time.monotonic()
            self.last_loss = self.optimizer_step(batch)
            self.step_seconds.append(time.monotonic() - step_started)
            if not math.isfinite(self.last_loss):
                raise RuntimeError(f"The loss became {self.last_loss} at step {self.step}")
            self.step += 1
            finished_epoch = math.ceil(self.step / self.steps_per_epoch)
            epoch_done = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            if epoch_done and (finished_epoch % self.spec.save_every_n_epochs == 0 or self.step == self.total_steps):
                self._save_epoch(finished_epoch)
            if self.step % self.config.checkpoint_every_steps == 0 and self.step < self.total_steps:
                self._save_checkpoint()
            rate = (self.step - start_step) / max(time.monotonic() - started, 1e-9)
            self.progress.write(
                step=self.step,
                total_steps=self.total_steps,
                epoch=finished_epoch,
                total_epochs=self.total_epochs,
                loss=self.last_loss,
                it_per_second=rate,
                eta_seconds=(self.total_steps - self.step) / rate if rate > 0 else None,
            )

    # ---------------------------------------------------------------- LoRA state

    def _peft_state(self, module: Any) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = get_peft_model_state_dict(self.accelerator.unwrap_model(module))
        return state

    def lora_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The trained LoRA weights per kohya prefix (peft key names)."""
        return {prefix: self._peft_state(module) for prefix, module in self.trained.items()}

    def load_lora_state(self, states: dict[str, dict[str, torch.Tensor]]) -> None:
        for prefix, module in self.trained.items():
            set_peft_model_state_dict(self.accelerator.unwrap_model(module), states[prefix])

    def kohya_file(self, states: dict[str, dict[str, torch.Tensor]], path: Path, *, epoch: int) -> Path:
        facts = self._facts(epoch=epoch)
        header = kohya.kohya_header(
            family=self.family,
            rank=self.spec.rank,
            alpha=self.spec.alpha,
            resolution=self.resolution,
            title=f"{self.config.namespace}/{self.config.character}/{self.config.version}",
            facts=facts,
            created=self.progress.now(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(kohya.to_kohya(states, alpha=self.spec.alpha), str(path), metadata=header)
        return path

    def _facts(self, *, epoch: int) -> dict[str, object]:
        spec = self.spec
        return {
            "num_train_images": len(self.samples),
            "num_epochs": self.total_epochs,
            "epoch": epoch,
            "steps": self.step,
            "max_train_steps": self.total_steps,
            "learning_rate": spec.unet_learning_rate,
            "unet_lr": spec.unet_learning_rate,
            "text_encoder_lr": spec.text_encoder_learning_rate or spec.unet_learning_rate
            if spec.train_text_encoder
            else None,
            "network_train_unet_only": not spec.train_text_encoder,
            "lr_scheduler": spec.scheduler,
            "lr_warmup_steps": spec.warmup_steps,
            "optimizer": spec.optimizer,
            "mixed_precision": spec.mixed_precision,
            "seed": spec.seed,
            "noise_offset": spec.noise_offset,
            "min_snr_gamma": spec.min_snr_gamma,
            "batch_size_per_device": spec.batch_size,
            "gradient_checkpointing": spec.gradient_checkpointing,
            "cache_latents": spec.cache_latents,
            "caption_dropout_rate": spec.caption_dropout_rate,
            "shuffle_caption": spec.shuffle_captions,
            "keep_tokens": spec.keep_tokens,
            "clip_skip": spec.clip_skip,
            "enable_bucket": spec.buckets.enabled,
            "sd_model_name": self.config.base_model.uri,
            "sd_model_version": self.config.base_model.version,
            "dataset_uri": self.config.dataset.uri,
            "dataset_revision": self.config.dataset.revision,
            # What kohya's tools and AUTOMATIC1111's LoRA info show: folders with repeats, caption tag counts.
            "dataset_dirs": json.dumps(self._dataset_dirs()),
            "tag_frequency": json.dumps(self._tag_frequency()),
        }

    def _dataset_dirs(self) -> dict[str, dict[str, int]]:
        dirs: dict[str, dict[str, int]] = {}
        for item in self.dataset.items:
            folder = item.relative.rpartition("/")[0] or "."
            entry = dirs.setdefault(folder, {"n_repeats": item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return dirs

    def _tag_frequency(self) -> dict[str, dict[str, int]]:
        frequency: dict[str, dict[str, int]] = {}
        for item in self.dataset.items:
            tags = frequency.setdefault(item.relative.rpartition("/")[0] or ".", {})
            for tag in (t.strip() for t in (item.caption or "").split(",")):
                if tag:
                    tags[tag] = tags.get(tag, 0) + 1
        return frequency

    def _save_epoch(self, epoch: int) -> None:
        path = self.kohya_file(self.lora_state(), self.out_dir / artifacts.epoch_file(epoch), epoch=epoch)
        self.uploads.submit(lambda: self._upload(artifacts.epoch_file(epoch), path))
        if epoch not in self.saved_epochs:
            self.saved_epochs.append(epoch)
        self.log(f"Saved epoch {epoch} at step {self.step}")

    # ---------------------------------------------------------------- resume state

    def _save_checkpoint(self) -> None:
        """LoRA, optimizer, scheduler, RNG and step to checkpoints/step-N/, then latest.json pointing at it."""
        if not self.is_main:
            return
        name = f"{artifacts.CHECKPOINTS_DIR}step-{self.step:07d}/"
        local = self.workdir / name
        local.mkdir(parents=True, exist_ok=True)
        flat = {f"{prefix}/{key}": t.contiguous() for prefix, s in self.lora_state().items() for key, t in s.items()}
        save_file(flat, str(local / "lora.safetensors"))
        torch.save(self.optimizer.state_dict(), local / "optimizer.pt")
        torch.save(self.lr_scheduler.state_dict(), local / "scheduler.pt")
        torch.save({"torch": torch.get_rng_state(), "generator": self.generator.get_state()}, local / "rng.pt")
        state = {"step": self.step, "prefix": name, "savedEpochs": list(self.saved_epochs), "loss": self.last_loss}
        step = self.step

        def upload() -> None:
            for file in sorted(local.iterdir()):
                self._upload(name + file.name, file)
            # latest.json is written only after every file of the state is in: a half-upload is never referenced.
            self.store.write_bytes(self.output_uri + LATEST_CHECKPOINT, json.dumps(state).encode())
            for info in self.store.list(self.output_uri + artifacts.CHECKPOINTS_DIR):
                relative = info.uri.removeprefix(self.output_uri)
                if relative.startswith(f"{artifacts.CHECKPOINTS_DIR}step-") and not relative.startswith(name):
                    self.store.delete_prefix(info.uri)
            shutil.rmtree(local, ignore_errors=True)
            self.log(f"Saved resume state at step {step}")

        self.uploads.submit(upload)

    def _resume(self) -> None:
        try:
            state = json.loads(self.store.read_bytes(self.output_uri + LATEST_CHECKPOINT))
        except NotFound:
            return
        local = self.workdir / state["prefix"]
        for file in ("lora.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"):
            self.store.download_file(f"{self.output_uri}{state['prefix']}{file}", local / file)
        states: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in self.trained}
        for key, tensor in load_file(str(local / "lora.safetensors")).items():
            prefix, _, name = key.partition("/")
            states[prefix][name] = tensor
        self.load_lora_state(states)
        self.optimizer.load_state_dict(torch.load(local / "optimizer.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(local / "scheduler.pt", weights_only=True))
        rng = torch.load(local / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        self.generator.set_state(rng["generator"])
        self.step = int(state["step"])
        self.saved_epochs = [int(e) for e in state["savedEpochs"]]
        self.last_loss = state["loss"]
        self.resumed_from = self.step
        self.log(f"Resumed from step {self.step} of {self.total_steps}")

    # ---------------------------------------------------------------- save

    def save(self) -> artifacts.Manifest | None:
        """Final LoRA (kohya + diffusers), grid picture, manifest.json last; then the resume state goes.

        Returns the manifest on the main process, None on the others.
        """
        from charlora_trainer.publishing import publish_version  # noqa: PLC0415 - keeps this module readable

        self.uploads.wait()  # every epoch file is in the store before the manifest can name it
        self.accelerator.wait_for_everyone()
        return publish_version(self) if self.is_main else None

    # ---------------------------------------------------------------- storage helpers

    def _upload(self, name: str, path: Path) -> None:
        if self.is_main:
            self.store.upload_file(self.output_uri + name, path)

    def _publish_file(self, name: str, path: Path) -> None:
        """Upload a file that the manifest will list (a local copy stays in out/ for its checksum)."""
        target = self.out_dir / name
        if path != target:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
        self._upload(name, target)

    def _publish_bytes(self, name: str, data: bytes) -> None:
        target = self.out_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        self._upload(name, target)
