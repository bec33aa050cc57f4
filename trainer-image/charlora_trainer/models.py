"""The base model: located (local directory, s3:// prefix downloaded once to a cache, or a hub id) and loaded."""

# diffusers and transformers ship no type hints for from_pretrained.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from charlora.api.characterlora import BaseModelSpec
from charlora.storing import S3Settings, StorageError, file_path, open_store
from charlora_trainer.failing import BadInput

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class BaseModel:
    """The loaded components of an SD1.5 or SDXL diffusers pipeline (text encoders as a list: 1 or 2)."""

    family: str
    path: Path
    unet: Any
    vae: Any
    tokenizers: list[Any]
    text_encoders: list[Any]
    noise_scheduler: Any
    hashes: dict[str, str] = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def align(self) -> int:
        """Pixel multiple a training image side must have: the VAE factor times the UNet's downsamplings."""
        return self.vae_scale_factor * int(2 ** (len(self.unet.config.block_out_channels) - 1))


def locate_base_model(spec: BaseModelSpec, *, cache_dir: Path, settings: S3Settings | None = None) -> Path:
    """A local diffusers folder for ``spec.uri``; an s3:// prefix is downloaded once into ``cache_dir``."""
    uri = spec.uri
    if uri.startswith("s3://"):
        target = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
        if (target / ".complete").is_file():
            return target
        store = open_store(uri, settings)
        prefix = uri if uri.endswith("/") else uri + "/"
        try:
            objects = list(store.list(prefix))
            for info in objects:
                store.download_file(info.uri, target / info.uri.removeprefix(prefix))
        except StorageError as err:
            raise BadInput(f"Could not read the base model {uri}: {err}") from err
        if not objects:
            raise BadInput(f"The base model {uri} is empty (expected a diffusers folder with model_index.json)")
        (target / ".complete").write_text(uri)  # a half-finished download is fetched again
        return target
    local = file_path(uri) if uri.startswith("file://") else Path(uri)
    if local.is_dir():
        return local
    if uri.startswith(("/", "file://", ".")):
        raise BadInput(f"The base model {uri} is not a directory")
    try:  # a hub id: huggingface_hub fetches it into HF_HOME once
        from huggingface_hub import snapshot_download  # noqa: PLC0415 - only hub ids need it

        return Path(snapshot_download(uri, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
    except Exception as err:
        raise BadInput(f"Could not fetch the base model {uri!r} from the hub: {err}") from err


def _weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for weights in sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        with weights.open("rb") as source:
            for block in iter(lambda: source.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def load_base_model(path: Path, family: str) -> BaseModel:
    """Loads tokenizer(s), text encoder(s), VAE, UNet and the training noise schedule in float32."""
    index = path / "model_index.json"
    if not index.is_file():
        raise BadInput(f"The base model at {path} is not a diffusers folder (no model_index.json)")
    components = json.loads(index.read_text())
    is_sdxl = "text_encoder_2" in components
    if is_sdxl != (family == "sdxl"):
        found = "sdxl" if is_sdxl else "sd15"
        raise BadInput(f"baseModel.family is {family} but the model at {path} is a {found} pipeline")
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")]
        text_encoders: list[Any] = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder")]
        if is_sdxl:
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"))
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"))
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=torch.float32)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError) as err:
        raise BadInput(f"Could not load the base model at {path}: {err}") from err
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if is_sdxl else [])
    return BaseModel(
        family=family,
        path=path,
        unet=unet,
        vae=vae,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        noise_scheduler=noise_scheduler,
        hashes={name: _weights_digest(path / name) for name in names},
    )
