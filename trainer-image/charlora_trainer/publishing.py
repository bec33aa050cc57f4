"""The end of a run: final LoRA in kohya and diffusers formats, the grid picture, then manifest.json (last)."""

# diffusers and peft ship few type hints.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file

from charlora import artifacts
from charlora_trainer import __version__, kohya

if TYPE_CHECKING:
    from charlora_trainer.recipe import LoRARecipe

LABEL_WIDTH, HEADER_HEIGHT = 120, 28
DIFFUSERS_COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder"}
DIFFUSERS_COMPONENT["lora_te2"] = "text_encoder_2"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        for block in iter(lambda: source.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_diffusers_lora(recipe: LoRARecipe, path: Path) -> Path:
    """The final LoRA with diffusers/PEFT keys and adapter metadata: loads with ``pipeline.load_lora_weights``."""
    pipeline_class: Any = StableDiffusionXLPipeline if recipe.family == "sdxl" else StableDiffusionPipeline
    layers: dict[str, Any] = {}
    for prefix, module in recipe.trained.items():
        component = DIFFUSERS_COMPONENT[prefix]
        unwrapped = recipe.accelerator.unwrap_model(module)
        layers[f"{component}_lora_layers"] = convert_state_dict_to_diffusers(recipe._peft_state(module))
        layers[f"{component}_lora_adapter_metadata"] = unwrapped.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=recipe.workdir) as scratch:
        pipeline_class.save_lora_weights(scratch, weight_name=path.name, safe_serialization=True, **layers)
        path.parent.mkdir(parents=True, exist_ok=True)
        Path(scratch, path.name).replace(path)
    return path


def _pipeline(recipe: LoRARecipe) -> Any:
    base = recipe.base
    unwrap = recipe.accelerator.unwrap_model
    scheduler = EulerDiscreteScheduler.from_config(base.noise_scheduler.config)
    encoders = [unwrap(e) for e in base.text_encoders]
    if recipe.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=base.vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=base.tokenizers[0],
            tokenizer_2=base.tokenizers[1],
            unet=unwrap(base.unet),
            scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=encoders[0],
        tokenizer=base.tokenizers[0],
        unet=unwrap(base.unet),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def grid_prompts(recipe: LoRARecipe) -> list[str]:
    """The configured sample prompts, else the first caption of the dataset."""
    if recipe.spec.sample_prompts:
        return list(recipe.spec.sample_prompts)
    return [next((s.caption for s in recipe.samples if s.caption), recipe.config.character)]


@torch.no_grad()
def render_grid(recipe: LoRARecipe, path: Path) -> tuple[int, int]:
    """grid.png: rows = "no LoRA" then every saved epoch; columns = prompts x CFG scales; one fixed seed.

    Returns (rows, columns).
    """
    recipe.restore_frozen()
    pipe = _pipeline(recipe)
    pipe.set_progress_bar_config(disable=True)
    prompts = grid_prompts(recipe)
    scales = [float(s) for s in recipe.spec.grid_cfg_scales]
    rows: list[tuple[str, int | None]] = [("no LoRA", None)] + [(f"epoch {e}", e) for e in recipe.saved_epochs]
    size = recipe.resolution
    columns = [(prompt, scale) for prompt in prompts for scale in scales]
    grid = Image.new("RGB", (LABEL_WIDTH + len(columns) * size, HEADER_HEIGHT + len(rows) * size), "white")
    draw = ImageDraw.Draw(grid)
    for col, (prompt, scale) in enumerate(columns):
        # Tiles can be narrow: the header names the prompt by number; the PNG text chunk holds the prompts.
        draw.text((LABEL_WIDTH + col * size + 4, 4), f"p{prompts.index(prompt) + 1} cfg {scale:g}", fill="black")
    modules = [recipe.accelerator.unwrap_model(m) for m in recipe.trained.values()]
    for modules_state in modules:
        modules_state.eval()
    for row, (label, epoch) in enumerate(rows):
        draw.text((4, HEADER_HEIGHT + row * size + 4), label, fill="black")
        if epoch is None:
            for module in modules:
                module.disable_adapters()
        else:
            state = load_file(str(epoch_path(recipe, epoch)))
            recipe.load_lora_state(kohya.from_kohya(state, recipe.module_names))
            for module in modules:
                module.enable_adapters()
        for col, (prompt, scale) in enumerate(columns):
            generator = torch.Generator().manual_seed(recipe.spec.seed)
            image = pipe(
                prompt,
                guidance_scale=scale,
                num_inference_steps=recipe.config.sample_steps,
                height=size,
                width=size,
                generator=generator,
            ).images[0]
            grid.paste(image, (LABEL_WIDTH + col * size, HEADER_HEIGHT + row * size))
    for module in modules:
        module.enable_adapters()
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for number, prompt in enumerate(prompts, start=1):
        info.add_text(f"prompt {number}", prompt)
    info.add_text("rows", json.dumps([label for label, _ in rows]))
    grid.save(path, format="PNG", pnginfo=info)
    return len(rows), len(columns)


def epoch_path(recipe: LoRARecipe, epoch: int) -> Path:
    """The local copy of a saved epoch, fetched from the store when an earlier pod of this run wrote it."""
    local = recipe.out_dir / artifacts.epoch_file(epoch)
    if not local.is_file():
        recipe.store.download_file(recipe.output_uri + artifacts.epoch_file(epoch), local)
    return local


def _report_phase(recipe: LoRARecipe, phase: Literal["uploading", "sampling", "done"]) -> None:
    """progress.json after the last step: training is done; publishing is under way or finished."""
    recipe.progress.write(
        step=recipe.step,
        total_steps=recipe.total_steps,
        epoch=recipe.total_epochs,
        total_epochs=recipe.total_epochs,
        loss=recipe.last_loss,
        phase=phase,
        force=True,
    )


def publish_version(recipe: LoRARecipe) -> artifacts.Manifest:
    final_states = recipe.lora_state()
    _report_phase(recipe, "uploading")
    recipe.kohya_file(final_states, recipe.out_dir / artifacts.LORA, epoch=recipe.total_epochs)
    recipe._publish_file(artifacts.LORA, recipe.out_dir / artifacts.LORA)
    write_diffusers_lora(recipe, recipe.out_dir / artifacts.LORA_DIFFUSERS)
    recipe._publish_file(artifacts.LORA_DIFFUSERS, recipe.out_dir / artifacts.LORA_DIFFUSERS)
    _report_phase(recipe, "sampling")
    render_grid(recipe, recipe.out_dir / artifacts.GRID)
    recipe.load_lora_state(final_states)
    recipe._publish_file(artifacts.GRID, recipe.out_dir / artifacts.GRID)
    names = [
        artifacts.LINT_REPORT,
        artifacts.LORA,
        artifacts.LORA_DIFFUSERS,
        artifacts.GRID,
        *(artifacts.epoch_file(e) for e in sorted(recipe.saved_epochs)),
    ]
    for epoch in recipe.saved_epochs:
        epoch_path(recipe, epoch)
    files = [
        artifacts.ManifestFile(
            path=name, sha256=sha256_of(recipe.out_dir / name), size=(recipe.out_dir / name).stat().st_size
        )
        for name in names
    ]
    config = recipe.config
    manifest = artifacts.Manifest(
        namespace=config.namespace,
        character=config.character,
        version=config.version,
        base_model=artifacts.ManifestBaseModel(
            family=config.base_model.family,
            uri=config.base_model.uri,
            version=config.base_model.version,
            hashes=recipe.base.hashes,
        ),
        files=files,
        epochs=sorted(recipe.saved_epochs),
        steps=recipe.step,
        final_loss=recipe.last_loss,
        training=recipe.spec.to_wire(),
        created_at=recipe.progress.now(),
        trainer_version=__version__,
    )
    # Written last: a version without a manifest does not exist, so nothing half-written is ever referenced.
    recipe.store.write_bytes(
        recipe.output_uri + artifacts.MANIFEST,
        manifest.model_dump_json(by_alias=True, indent=2).encode(),
        content_type="application/json",
    )
    recipe.store.delete_prefix(recipe.output_uri + artifacts.CHECKPOINTS_DIR)
    _report_phase(recipe, "done")
    return manifest
