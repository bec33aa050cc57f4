"""Reads a LoRA file's safetensors header without torch and without unpickling anything, and describes it.

A safetensors file is an 8-byte little-endian header length, a JSON header (tensor names, dtypes, shapes, offsets,
and a ``__metadata__`` table of strings), then raw tensor bytes. Anything else (a pickled ``.ckpt``, a zip, a
truncated file) is refused before a single value is interpreted.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FAMILIES = {"sd_v1": "sd15", "sdxl_base_v1-0": "sdxl"}
HASH_KEYS = re.compile(r"hash|sha256", re.IGNORECASE)
FACT_KEYS = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_learning_rate",
    "ss_unet_lr",
    "ss_text_encoder_lr",
    "ss_optimizer",
    "ss_lr_scheduler",
    "ss_num_epochs",
    "ss_epoch",
    "ss_steps",
    "ss_max_train_steps",
    "ss_batch_size_per_device",
    "ss_resolution",
    "ss_seed",
    "ss_mixed_precision",
    "ss_noise_offset",
    "ss_min_snr_gamma",
    "ss_num_train_images",
    "ss_training_started_at",
    "ss_training_finished_at",
    "ss_output_name",
    "modelspec.title",
    "modelspec.architecture",
    "modelspec.date",
)


class NotSafetensors(ValueError):
    """The file is not a well-formed safetensors file; nothing in it was interpreted."""


@dataclass
class Tensor:
    dtype: str
    shape: list[int]
    offsets: tuple[int, int]


@dataclass
class LoRAReport:
    path: Path
    format: str  # "kohya", "diffusers", "unknown"
    family: str  # "sd15", "sdxl", "unknown"
    tensors: int
    groups: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # group -> {"rank": [...], "alpha": [...]}
    base_model_version: str | None = None
    hashes: dict[str, str] = field(default_factory=dict)
    facts: dict[str, str] = field(default_factory=dict)
    loads_in: dict[str, str] = field(default_factory=dict)  # tool -> "yes" / "no: reason"

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "format": self.format,
            "family": self.family,
            "tensors": self.tensors,
            "groups": self.groups,
            "baseModelVersion": self.base_model_version,
            "hashes": self.hashes,
            "facts": self.facts,
            "loadsIn": self.loads_in,
        }


def read_header(path: Path) -> tuple[dict[str, Tensor], dict[str, str], int]:
    """(tensors, metadata, offset of the data section); raises NotSafetensors naming what is wrong."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise NotSafetensors(f"{path} is too short to be a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", prefix)
        if length == 0 or length > min(MAX_HEADER_BYTES, size - 8):
            kind = " (it looks like a zip / pickled .ckpt)" if prefix[:2] == b"PK" else ""
            kind = kind or (" (it looks like a pickle)" if prefix[:1] == b"\x80" else "")
            raise NotSafetensors(f"{path} is not a safetensors file{kind}; only safetensors LoRAs are read")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NotSafetensors(f"{path} has an unreadable safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise NotSafetensors(f"{path} has a safetensors header that is not a table")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, Tensor] = {}
    data_size = size - 8 - length
    for name, info in header.items():
        try:
            start, end = (int(v) for v in info["data_offsets"])
            tensor = Tensor(str(info["dtype"]), [int(d) for d in info["shape"]], (start, end))
        except (KeyError, TypeError, ValueError) as err:
            raise NotSafetensors(f"{path}: tensor {name!r} has a malformed entry") from err
        if not 0 <= start <= end <= data_size:
            raise NotSafetensors(f"{path} is truncated: tensor {name!r} ends past the end of the file")
        tensors[name] = tensor
    return tensors, {str(k): str(v) for k, v in metadata.items()}, 8 + length


def _scalar(path: Path, tensor: Tensor, data_start: int) -> float | None:
    """The value of a one-element F32/F16/BF16 tensor (a kohya .alpha), read from its bytes."""
    if (
        tensor.dtype not in ("F32", "F16", "BF16")
        or (tensor.offsets[1] - tensor.offsets[0]) != DTYPE_SIZES[tensor.dtype]
    ):
        return None
    with path.open("rb") as handle:
        handle.seek(data_start + tensor.offsets[0])
        raw = handle.read(DTYPE_SIZES[tensor.dtype])
    if tensor.dtype == "F32":
        return float(struct.unpack("<f", raw)[0])
    if tensor.dtype == "F16":
        return float(struct.unpack("<e", raw)[0])
    return float(struct.unpack("<f", b"\x00\x00" + raw)[0])  # bf16 is the top half of an f32


def _group(name: str) -> str:
    lowered = name.lower()
    if lowered.startswith(("lora_te2", "text_encoder_2")):
        return "text_encoder_2"
    if lowered.startswith(("lora_te", "text_encoder")):
        return "text_encoder"
    for pattern, group in (
        ("down_blocks|input_blocks", "unet.down"),
        ("mid_block|middle_block", "unet.mid"),
        ("up_blocks|output_blocks", "unet.up"),
    ):
        if re.search(pattern, lowered):
            return group
    return "unet.other"


def inspect_lora(path: Path) -> LoRAReport:
    tensors, metadata, data_start = read_header(path)
    names = list(tensors)
    if any(n.startswith("lora_unet_") or n.startswith("lora_te") for n in names):
        fmt = "kohya"
    elif any(".lora_A." in n or ".lora.down." in n or ".lora_B." in n for n in names):
        fmt = "diffusers"
    else:
        fmt = "unknown"
    version = metadata.get("ss_base_model_version")
    family = FAMILIES.get(version or "", "unknown")
    if family == "unknown":
        architecture = metadata.get("modelspec.architecture", "")
        if "stable-diffusion-xl" in architecture or any(n.startswith(("lora_te2", "text_encoder_2")) for n in names):
            family = "sdxl"
        elif "stable-diffusion-v1" in architecture:
            family = "sd15"

    groups: dict[str, dict[str, list[float]]] = {}
    for name, tensor in tensors.items():
        group = groups.setdefault(_group(name), {"rank": [], "alpha": []})
        is_down = name.endswith(("lora_down.weight", "lora_A.weight", "lora.down.weight"))
        if is_down and tensor.shape and float(tensor.shape[0]) not in group["rank"]:
            group["rank"].append(float(tensor.shape[0]))
        value = _scalar(path, tensor, data_start) if name.endswith(".alpha") else None
        if value is not None and value not in group["alpha"]:
            group["alpha"].append(value)
    for group in groups.values():
        group["rank"].sort()
        group["alpha"].sort()

    loads_in = {
        "AUTOMATIC1111": "yes" if fmt == "kohya" else "no: it reads kohya keys (lora_unet_*, lora_te*) only",
        "ComfyUI": "yes" if fmt in ("kohya", "diffusers") else "no: no LoRA keys it knows",
        "diffusers": "yes" if fmt in ("kohya", "diffusers") else "no: no LoRA keys it knows",
    }
    if fmt == "kohya" and not any(n.endswith(".alpha") for n in names):
        loads_in["AUTOMATIC1111"] = "yes (no .alpha tensors: alpha defaults to the rank)"
    return LoRAReport(
        path=path,
        format=fmt,
        family=family,
        tensors=len(tensors),
        groups=dict(sorted(groups.items())),
        base_model_version=version,
        hashes={k: v for k, v in sorted(metadata.items()) if HASH_KEYS.search(k)},
        facts={k: metadata[k] for k in FACT_KEYS if k in metadata},
        loads_in=loads_in,
    )


def render(report: LoRAReport) -> str:
    lines = [
        f"file:        {report.path}",
        f"format:      {report.format} keys ({report.tensors} tensors)",
        f"family:      {report.family}",
        f"base model:  {report.base_model_version or 'not recorded in the header'}",
        "rank/alpha per block group:",
    ]
    for group, values in report.groups.items():
        ranks = ", ".join(f"{r:g}" for r in values["rank"]) or "-"
        alphas = ", ".join(f"{a:g}" for a in values["alpha"]) or "-"
        lines.append(f"  {group:<16} rank {ranks:<10} alpha {alphas}")
    lines.append("hashes:" if report.hashes else "hashes:      none in the header")
    lines += [f"  {k}: {v}" for k, v in report.hashes.items()]
    lines.append("training facts:" if report.facts else "training facts: none in the header")
    lines += [f"  {k}: {v}" for k, v in report.facts.items()]
    lines.append("loads in:")
    lines += [f"  {tool:<14} {verdict}" for tool, verdict in report.loads_in.items()]
    return "\n".join(lines)
