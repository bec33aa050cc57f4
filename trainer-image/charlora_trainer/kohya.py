"""Kohya-format LoRA files: peft state dicts <-> ``lora_unet_*``/``lora_te*`` keys with ``.alpha``, and the
ss_* / modelspec.* header that ComfyUI, AUTOMATIC1111 and kohya's tools read.

Module names stay diffusers names with dots turned into underscores (``lora_unet_down_blocks_0_attentions_0_...``):
the form ComfyUI and AUTOMATIC1111 map onto their own UNet and diffusers' ``load_lora_weights`` converts back.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import torch

BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
# The text encoders' kohya prefixes: one encoder is lora_te, SDXL's two are lora_te1 and lora_te2.
TEXT_ENCODER_PREFIXES = {1: ["lora_te"], 2: ["lora_te1", "lora_te2"]}

PEFT_DOWN, PEFT_UP = ".lora_A.weight", ".lora_B.weight"


def kohya_prefixes(text_encoders: int) -> list[str]:
    return ["lora_unet", *TEXT_ENCODER_PREFIXES[text_encoders]]


def to_kohya(
    components: Mapping[str, Mapping[str, torch.Tensor]], *, alpha: float, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """``{"lora_unet": peft_state, "lora_te1": ...}`` -> one kohya state dict (contiguous ``dtype`` tensors)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, state in components.items():
        for key, tensor in state.items():
            if key.endswith(PEFT_DOWN):
                module, kind = key.removesuffix(PEFT_DOWN), "lora_down"
            elif key.endswith(PEFT_UP):
                module, kind = key.removesuffix(PEFT_UP), "lora_up"
            else:
                raise ValueError(f"unexpected LoRA tensor {key!r}: only lora_A/lora_B weights are exported")
            name = f"{prefix}_{module.replace('.', '_')}"
            out[f"{name}.{kind}.weight"] = tensor.detach().to("cpu", dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def from_kohya(
    state: Mapping[str, torch.Tensor], modules: Mapping[str, list[str]]
) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of :func:`to_kohya` given each component's peft module names (``{"lora_unet": [...]}``)."""
    names = {
        f"{prefix}_{module.replace('.', '_')}": (prefix, module)
        for prefix, module_names in modules.items()
        for module in module_names
    }
    out: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in modules}
    for key, tensor in state.items():
        name, _, kind = key.partition(".")
        if kind == "alpha":
            continue
        prefix, module = names[name]
        suffix = PEFT_DOWN if kind == "lora_down.weight" else PEFT_UP
        out[prefix][module + suffix] = tensor.to(torch.float32)
    return out


def kohya_header(
    *,
    family: str,
    rank: int,
    alpha: int,
    resolution: int,
    title: str,
    facts: Mapping[str, object],
    created: datetime.datetime,
) -> dict[str, str]:
    """The safetensors metadata: ss_* training facts (kohya sd-scripts names) and the SAI modelspec keys."""
    header = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": "False",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[family],
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "epsilon",
        "modelspec.date": created.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    header.update({f"ss_{key}": str(value) for key, value in facts.items() if value is not None})
    return header
