"""Tiny randomly initialised SD1.5-like and SDXL-like diffusers pipelines for tests and benchmarks (no downloads).

The pipelines have the real component classes and folder layout (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/`` and, for SDXL, ``text_encoder_2/`` and ``tokenizer_2/``), the
real VAE downsampling factor (8) and SDXL's micro-conditioning (``text_time`` embeddings), but only a few thousand
weights each, so a 64 px training step or a 2-step inference takes a fraction of a second on a CPU. The CLIP
tokenizers are built from a byte-level vocabulary written here: nothing is fetched from a hub.

Usage::

    from charlora.devtools.tiny_models import build_tiny_pipeline, TINY_RESOLUTION
    path = build_tiny_pipeline("sdxl", tmp_path / "sdxl", seed=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    image = pipe("a cat", num_inference_steps=2, height=TINY_RESOLUTION, width=TINY_RESOLUTION).images[0]

Equal ``seed`` gives bit-identical weights, so two builds hash the same.
"""

# diffusers ships no type hints for its constructors.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

Family = Literal["sd15", "sdxl"]

TINY_RESOLUTION = 64
"""The native resolution of the tiny pipelines: 64 px images, 8x8 latents."""
TEXT_HIDDEN = 32
MAX_TOKENS = 77
# The scaling factors of the real VAEs: latents of the tiny models keep the same statistics contract.
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (every byte gets one visible character)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    chars = visible[:]
    extra = 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(visible, (chr(c) for c in chars), strict=True))


def write_tiny_tokenizer(directory: Path) -> Path:
    """Writes a CLIP BPE tokenizer (vocab.json, merges.txt, configs) with a 512 + 2 token byte-level vocabulary.

    Every word is split into single characters (no merges); that is enough for prompts to map to distinct ids.
    """
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return directory


def tiny_vocab_size() -> int:
    return 2 * 256 + 2


def _text_config(*, projection: bool) -> Any:
    return CLIPTextConfig(
        vocab_size=tiny_vocab_size(),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_HIDDEN if projection else 512,
        bos_token_id=tiny_vocab_size() - 2,
        eos_token_id=tiny_vocab_size() - 1,
        pad_token_id=tiny_vocab_size() - 1,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
    )


def _vae(family: Family) -> Any:
    # Four blocks: three downsamplings, the real factor of 8 between pixels and latents.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=VAE_SCALING[family],
        force_upcast=family == "sdxl",
    )


def _unet(family: Family) -> Any:
    common: dict[str, Any] = {
        "sample_size": TINY_RESOLUTION // 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "norm_num_groups": 8,
    }
    if family == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8)
    time_dim = 8
    return UNet2DConditionModel(
        **common,
        cross_attention_dim=2 * TEXT_HIDDEN,  # both text encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        # pooled text embedding + 6 micro-conditioning numbers (original size, crop, target size)
        projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * time_dim,
    )


def _scheduler() -> Any:
    # The noise schedule of SD1.5 and SDXL: a trainer reads it back with DDPMScheduler.from_pretrained.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_pipeline(family: Family, directory: Path, *, seed: int = 0) -> Path:
    """Builds a tiny random pipeline of ``family`` and saves it with ``save_pretrained`` into ``directory``.

    Returns ``directory``; load it with ``StableDiffusionPipeline`` (sd15) or ``StableDiffusionXLPipeline`` (sdxl)
    ``.from_pretrained(directory)``. Weights are float32 and depend only on ``seed``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = write_tiny_tokenizer(directory / ".tiny-tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)

    # One generator state per component, so adding a component never changes another one's weights.
    torch.manual_seed(seed)
    unet = _unet(family)
    torch.manual_seed(seed + 1)
    vae = _vae(family)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config(projection=False))
    pipe: Any
    if family == "sd15":
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    elif family == "sdxl":
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection=True))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_dir),
            unet=unet,
            scheduler=_scheduler(),
            force_zeros_for_empty_prompt=True,
        )
    else:
        raise ValueError(f"unknown family {family!r}: use sd15 or sdxl")
    pipe.save_pretrained(directory, safe_serialization=True)
    for leftover in tokenizer_dir.iterdir():
        leftover.unlink()
    tokenizer_dir.rmdir()
    return directory


def tiny_character(name: str, *, base: Path, dataset: str, **training: Any) -> dict[str, Any]:
    """A CharacterLoRA that trains in seconds on a CPU: the tiny SD1.5-like ``base``, 64 px, no GPU.

    ``training`` overrides fields of spec.training (camelCase), e.g. ``epochs=4``.
    """
    return {
        "apiVersion": "charlora.dev/v1alpha1",
        "kind": "CharacterLoRA",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"family": "sd15", "uri": str(base), "version": "tiny-sd15"},
            "dataset": {"uri": dataset, "minImages": 4, "characterToken": name},
            "training": {
                "rank": 4,
                "alpha": 4,
                "epochs": 2,
                "resolution": TINY_RESOLUTION,
                "mixedPrecision": "no",
                "buckets": {"minResolution": TINY_RESOLUTION},
                "samplePrompts": ["a person in a park"],
                "gridCfgScales": ["4"],
                **training,
            },
            "resources": {"gpus": 0},
        },
    }
