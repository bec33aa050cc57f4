"""Test LoRAs and published versions: a peft LoRA with random non-zero weights attached to a tiny base's UNet, saved
as safetensors (diffusers or kohya keys), and versions uploaded to a real store with a manifest."""

from __future__ import annotations

import datetime
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save as safetensors_bytes
from transformers import CLIPTextModel

from charlora.api.serving import ServingEntry
from charlora.artifacts import (
    LORA_DIFFUSERS,
    MANIFEST,
    Manifest,
    ManifestBaseModel,
    ManifestFile,
    VersionLocation,
    epoch_file,
)
from charlora.storing import S3Settings, open_store

BASE_VERSION = "tiny-sd15-v0"


def build_lora_bytes(base: Path, *, seed: int, rank: int = 4, kohya: bool = False, text_encoder: bool = False) -> bytes:
    """A LoRA for ``base`` with random non-zero weights, as safetensors: diffusers keys (``unet.``...), or with
    ``kohya`` the same weights under kohya keys (``lora_unet_...``), as the trainer writes epoch checkpoints.
    ``text_encoder`` adds LoRA layers on the (first) text encoder's attention projections too."""
    unet = UNet2DConditionModel.from_pretrained(base / "unet")  # type: ignore[no-untyped-call]
    unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    if kohya:
        layers = convert_state_dict_to_kohya(get_peft_model_state_dict(unet))  # type: ignore[no-untyped-call]
        # diffusers' converter prefixes the lora_down/lora_up keys with lora_unet_ but not the .alpha keys.
        kohya_keys = {
            key if key.startswith("lora_unet_") else f"lora_unet_{key}": value for key, value in layers.items()
        }
        return safetensors_bytes({key: value.contiguous() for key, value in kohya_keys.items()})
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))  # type: ignore[no-untyped-call]
    extra: dict[str, Any] = {}
    if text_encoder:
        encoder = CLIPTextModel.from_pretrained(base / "text_encoder")
        encoder.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
        )
        with torch.no_grad():
            for name, parameter in encoder.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
        extra["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(  # type: ignore[no-untyped-call]
            get_peft_model_state_dict(encoder)
        )
    out = base.parent / f"lora-{seed}-{'te' if text_encoder else 'unet'}"
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True, **extra)
    return (out / "pytorch_lora_weights.safetensors").read_bytes()


@dataclass(frozen=True)
class World:
    """A tiny base model and LoRAs, plus a bucket to publish versions into."""

    base: Path
    loras: dict[int, bytes]
    store_uri: str
    s3: S3Settings

    def publish(
        self,
        namespace: str,
        character: str,
        *,
        version: str,
        lora: bytes,
        pinned: bool = False,
        file_name: str = LORA_DIFFUSERS,
        manifest_bytes: bytes | None = None,
        base_version: str = BASE_VERSION,
        epochs: dict[int, bytes] | None = None,
        serve_epoch: int | None = None,
        family: Literal["sd15", "sdxl"] = "sd15",
    ) -> ServingEntry:
        """Uploads a version (LoRA + manifest listing its sha256) and returns the table entry serving it.

        ``manifest_bytes`` overrides what the manifest records for the file (to publish a tampered version);
        ``epochs`` adds epoch checkpoints, and ``serve_epoch`` makes the entry serve one of them.
        """
        location = VersionLocation(self.store_uri, namespace, character, version)
        store = open_store(location.uri, self.s3)
        store.write_bytes(location.file(file_name), lora)
        recorded = lora if manifest_bytes is None else manifest_bytes
        sha256 = hashlib.sha256(recorded).hexdigest()
        files = [ManifestFile(path=file_name, sha256=sha256, size=len(recorded))]
        for epoch, data in (epochs or {}).items():
            store.write_bytes(location.file(epoch_file(epoch)), data)
            files.append(ManifestFile(path=epoch_file(epoch), sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
        if serve_epoch is not None:
            sha256 = next(item.sha256 for item in files if item.path == epoch_file(serve_epoch))
        manifest = Manifest(
            namespace=namespace,
            character=character,
            version=version,
            base_model=ManifestBaseModel(family=family, uri=str(self.base), version=base_version),
            files=files,
            epochs=sorted(epochs or {}),
            created_at=datetime.datetime.now(datetime.UTC),
        )
        store.write_bytes(location.file(MANIFEST), manifest.model_dump_json(by_alias=True).encode())
        return ServingEntry(
            namespace=namespace,
            character=character,
            version=version,
            epoch=serve_epoch,
            artifact_uri=location.uri,
            sha256=sha256,
            pinned=pinned,
            base_model_family=family,
            base_model_version=base_version,
        )


def pickled_checkpoint() -> bytes:
    """What a .ckpt is: a pickle, which can run code when loaded, so the server must never unpickle one."""
    buffer = io.BytesIO()
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, buffer)
    return buffer.getvalue()


Publish = Callable[..., ServingEntry]
