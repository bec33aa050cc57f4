"""Turns a Kohya configuration (kohya_ss GUI JSON export, or an sd-scripts TOML config) into a CharacterLoRA.

Pure: text in, a manifest dict plus what could not be carried over out. Every setting with a counterpart is
mapped; every other setting that is not at its neutral default is reported with a reason; any ``<tune>``
placeholder left in the file refuses the whole import, naming each key.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from charlora.api.base import PLACEHOLDER
from charlora.api.characterlora import CharacterLoRA

SCHEDULERS = {"cosine": "cosine", "constant": "constant", "linear": "linear", "constant_with_warmup": "constant"}
OPTIMIZERS = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "prodigy": "Prodigy", "adamw_8bit": "AdamW8bit"}
PRECISIONS = {"fp16": "fp16", "bf16": "bf16", "no": "no", "fp32": "no", "float": "no"}
WINDOWS_PATH = re.compile(r"^[A-Za-z]:[\\/]")
PROMPT_FLAG = re.compile(r"\s--([a-z]+)\s+((?:(?!\s--[a-z]+\s).)*)")

# Settings that exist in Kohya but have no counterpart, with the reason; reported only when not neutral.
UNSUPPORTED: dict[str, str] = {
    "xformers": "charlora always uses PyTorch scaled-dot-product attention",
    "mem_eff_attn": "charlora always uses PyTorch scaled-dot-product attention",
    "sdpa": "charlora always uses PyTorch scaled-dot-product attention",
    "flip_aug": "image augmentation is not supported (it mirrors asymmetric character features)",
    "color_aug": "image augmentation is not supported",
    "random_crop": "random cropping is not supported; buckets keep whole images",
    "reg_data_dir": "regularisation images are not supported",
    "prior_loss_weight": "regularisation images are not supported",
    "bucket_no_upscale": "buckets never upscale small images in charlora (the dataset lint flags them instead)",
    "max_grad_norm": "gradient clipping is fixed in the trainer",
    "network_dropout": "LoRA dropout is not supported",
    "rank_dropout": "LoRA dropout is not supported",
    "module_dropout": "LoRA dropout is not supported",
    "scale_weight_norms": "weight-norm scaling is not supported",
    "gradient_accumulation_steps": "gradient accumulation is not supported; raise batchSize instead",
    "lr_scheduler_num_cycles": "cosine with restarts is not supported",
    "lr_scheduler_power": "the polynomial schedule is not supported",
    "optimizer_args": "optimizer arguments are fixed per optimizer in the trainer",
    "v2": "Stable Diffusion 2.x is not supported (sd15 and sdxl are)",
    "v_parameterization": "v-prediction models are not supported",
    "full_fp16": "mixed precision is chosen with mixedPrecision",
    "full_bf16": "mixed precision is chosen with mixedPrecision",
    "adaptive_noise_scale": "adaptive noise scale is not supported; noiseOffset is",
    "multires_noise_iterations": "multi-resolution noise is not supported; noiseOffset is",
    "multires_noise_discount": "multi-resolution noise is not supported; noiseOffset is",
    "caption_dropout_every_n_epochs": "only per-step caption dropout (captionDropoutRate) is supported",
    "max_token_length": "captions are limited to the text encoder's 77 tokens",
    "resume": "charlora resumes its own runs from their checkpoints",
    "network_weights": "training always starts from a fresh LoRA",
    "vae": "the base model's own VAE is used",
    "sample_every_n_steps": "samples are rendered per saved epoch into the grid picture",
    "LoRA_type": "only standard LoRA (LierLa) is trained",
    "network_module": "only standard LoRA (networks.lora) is trained",
}
# Settings that only say where things are on the machine that ran Kohya, or how it logged and saved.
LOCATIONS = {
    "pretrained_model_name_or_path": "give the base model with --base-model-uri",
    "train_data_dir": "give the dataset with --dataset",
    "output_dir": "charlora stores versions in object storage",
    "logging_dir": "charlora reports progress in the object's status",
    "output_name": "versions are named v1, v2, ... under the CharacterLoRA's name",
}
# Kohya settings that charlora decides on its own terms: nothing to carry over.
IMPLIED = frozenset(
    {
        "save_model_as",
        "save_precision",
        "cache_latents_to_disk",
        "max_data_loader_n_workers",
        "persistent_data_loader_workers",
        "model_list",
        "sample_sampler",
        "sample_every_n_epochs",
        "save_every_n_steps",
        "network_train_text_encoder_only",
        "noise_offset_type",
    }
)
# Kohya's own defaults for settings without a counterpart: at these values nothing is lost.
KOHYA_DEFAULTS: dict[str, Any] = {
    "prior_loss_weight": 1,
    "max_grad_norm": 1,
    "gradient_accumulation_steps": 1,
    "max_token_length": 75,
    "LoRA_type": "Standard",
    "network_module": "networks.lora",
    "xformers": "none",
    "multires_noise_discount": 0.3,
}


class ImportRefused(ValueError):
    """The configuration cannot be imported at all (placeholders, unreadable, invalid result)."""


@dataclass
class ImportResult:
    manifest: dict[str, Any]
    not_carried: list[str] = field(default_factory=list)  # "key: reason", one per setting
    warnings: list[str] = field(default_factory=list)


def read_kohya(text: str, *, filename: str) -> dict[str, Any]:
    """A flat dict of settings from a GUI JSON export or an sd-scripts TOML config (its tables are flattened)."""
    try:
        data = json.loads(text) if filename.endswith(".json") or text.lstrip().startswith("{") else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ImportRefused(f"{filename} is neither a kohya_ss JSON export nor an sd-scripts TOML file: {err}") from err
    if not isinstance(data, dict):
        raise ImportRefused(f"{filename} does not hold a table of settings")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # sd-scripts ignores table names: [model], [training], ... are groupings only
            flat.update(value)
        else:
            flat[key] = value
    return flat


def import_kohya(
    settings: Mapping[str, Any],
    *,
    name: str,
    dataset: str,
    base_model_uri: str,
    base_model_version: str,
    namespace: str | None = None,
) -> ImportResult:
    placeholders = sorted(key for key, value in settings.items() if PLACEHOLDER in str(value))
    if placeholders:
        raise ImportRefused(f"{PLACEHOLDER} placeholders left in: {', '.join(placeholders)} (fill them in first)")
    mapper = _Mapper(dict(settings))
    training = mapper.training()
    family = "sdxl" if _truthy(settings.get("sdxl")) or "xl" in str(settings.get("model_list", "")).lower() else "sd15"
    mapper.used.update({"sdxl"})
    if family == "sdxl" and _number(settings.get("clip_skip")) not in (None, 0, 1):
        mapper.not_carried.append("clip_skip: not used for sdxl")
        training.pop("clipSkip", None)
    dataset_spec: dict[str, Any] = {"uri": dataset}
    if (extension := settings.get("caption_extension")) and extension != ".txt":
        dataset_spec["captionExtension"] = extension
    mapper.used.add("caption_extension")

    for key, value in settings.items():
        if isinstance(value, str) and WINDOWS_PATH.match(value):
            mapper.warnings.append(f"{key}: {value!r} is a Windows path on the machine that ran Kohya; ignored")
    for key, reason in LOCATIONS.items():
        mapper.used.add(key)
        if settings.get(key) and not WINDOWS_PATH.match(str(settings[key])):
            mapper.not_carried.append(f"{key}: {reason}")
    mapper.used.update(IMPLIED)
    for key, value in settings.items():
        if key in mapper.used or _neutral(value) or _same(value, KOHYA_DEFAULTS.get(key)):
            continue
        reason = UNSUPPORTED.get(key, "no counterpart in charlora")
        mapper.not_carried.append(f"{key} = {value!r}: {reason}")

    manifest: dict[str, Any] = {
        "apiVersion": "charlora.dev/v1alpha1",
        "kind": "CharacterLoRA",
        "metadata": {"name": name, **({"namespace": namespace} if namespace else {})},
        "spec": {
            "baseModel": {"family": family, "uri": base_model_uri, "version": base_model_version},
            "dataset": dataset_spec,
            "training": training,
        },
    }
    try:
        CharacterLoRA.model_validate(manifest)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ImportRefused(f"The imported settings do not make a valid CharacterLoRA: {problems}") from err
    return ImportResult(manifest, mapper.not_carried, mapper.warnings)


class _Mapper:
    """Maps the settings with a counterpart, remembering which keys it consumed."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.used: set[str] = set()
        self.not_carried: list[str] = []
        self.warnings: list[str] = []

    def take(self, *keys: str) -> Any:
        """The first key with a non-empty value; all of ``keys`` count as carried over."""
        self.used.update(keys)
        for key in keys:
            value = self.settings.get(key)
            if value not in (None, ""):
                return value
        return None

    def training(self) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        simple: list[tuple[tuple[str, ...], str, Callable[[Any], Any]]] = [
            (("network_dim",), "rank", _int),
            (("train_batch_size",), "batchSize", _int),
            (("seed",), "seed", _int),
            (("save_every_n_epochs",), "saveEveryNEpochs", _int),
            (("keep_tokens",), "keepTokens", _int),
            (("gradient_checkpointing",), "gradientCheckpointing", _truthy),
            (("cache_latents",), "cacheLatents", _truthy),
            (("shuffle_caption",), "shuffleCaptions", _truthy),
            (("lr_warmup_steps",), "warmupSteps", _int),
        ]
        for keys, target, convert in simple:
            value = self.take(*keys)
            if value is not None:
                spec[target] = convert(value)
        self._alpha(spec)
        self._learning_rates(spec)
        self._length(spec)
        self._choices(spec)
        self._numbers(spec)
        self._resolution(spec)
        self._buckets(spec)
        self._prompts(spec)
        if (clip_skip := _number(self.take("clip_skip"))) not in (None, 0, 1):
            spec["clipSkip"] = int(clip_skip)
        return spec

    def _alpha(self, spec: dict[str, Any]) -> None:
        alpha = _number(self.take("network_alpha"))
        if alpha is None:
            return
        if alpha != int(alpha) or alpha < 1:
            rounded = max(1, round(alpha))
            self.warnings.append(f"network_alpha {alpha:g} is not a whole number >= 1: imported as {rounded}")
            alpha = rounded
        spec["alpha"] = int(alpha)

    def _learning_rates(self, spec: dict[str, Any]) -> None:
        unet = _number(self.take("unet_lr"))
        base = _number(self.take("learning_rate"))
        if unet or base:
            spec["unetLearningRate"] = _decimal(unet or base or 0)
        text_encoder = _number(self.take("text_encoder_lr"))
        unet_only = _truthy(self.take("network_train_unet_only"))
        if text_encoder and not unet_only:
            spec["trainTextEncoder"] = True
            spec["textEncoderLearningRate"] = _decimal(text_encoder)

    def _length(self, spec: dict[str, Any]) -> None:
        epochs = _number(self.take("max_train_epochs")) or _number(self.take("epoch"))
        steps = _number(self.take("max_train_steps"))
        if epochs:
            spec["epochs"] = int(epochs)
            if steps:
                self.not_carried.append(f"max_train_steps = {int(steps)}: epochs are set, and charlora takes one")
        elif steps:
            spec["maxSteps"] = int(steps)
        warmup_percent = _number(self.take("lr_warmup"))
        if warmup_percent and "warmupSteps" not in spec:
            if steps and not epochs:
                spec["warmupSteps"] = round(steps * warmup_percent / 100)
            else:
                self.not_carried.append(
                    f"lr_warmup = {warmup_percent:g}%: a percentage of the step count, which depends on the dataset; "
                    "set training.warmupSteps"
                )

    def _choices(self, spec: dict[str, Any]) -> None:
        scheduler = self.take("lr_scheduler")
        if scheduler:
            if str(scheduler).lower() in SCHEDULERS:
                spec["scheduler"] = SCHEDULERS[str(scheduler).lower()]
            else:
                self.not_carried.append(f"lr_scheduler = {scheduler!r}: supported are cosine, constant and linear")
        optimizer = self.take("optimizer", "optimizer_type")
        if _truthy(self.take("use_8bit_adam")):
            optimizer = "AdamW8bit"
        if optimizer:
            if str(optimizer).lower() in OPTIMIZERS:
                spec["optimizer"] = OPTIMIZERS[str(optimizer).lower()]
            else:
                self.not_carried.append(f"optimizer = {optimizer!r}: supported are AdamW, AdamW8bit and Prodigy")
        precision = self.take("mixed_precision")
        if precision:
            if str(precision).lower() in PRECISIONS:
                spec["mixedPrecision"] = PRECISIONS[str(precision).lower()]
            else:
                self.not_carried.append(f"mixed_precision = {precision!r}: supported are no, fp16 and bf16")

    def _numbers(self, spec: dict[str, Any]) -> None:
        for key, target in (
            ("noise_offset", "noiseOffset"),
            ("min_snr_gamma", "minSnrGamma"),
            ("caption_dropout_rate", "captionDropoutRate"),
        ):
            value = _number(self.take(key))
            if value:
                spec[target] = _decimal(value)

    def _resolution(self, spec: dict[str, Any]) -> None:
        raw = self.take("max_resolution", "resolution")
        if raw is None:
            return
        sides = [int(part) for part in re.split(r"[,x ]+", str(raw).strip()) if part]
        if len(set(sides)) > 1:
            self.warnings.append(f"resolution {raw!r} is not square: imported as {max(sides)} (buckets keep shapes)")
        spec["resolution"] = max(sides) // 8 * 8

    def _buckets(self, spec: dict[str, Any]) -> None:
        buckets: dict[str, Any] = {}
        enabled = self.take("enable_bucket")
        if enabled is not None:
            buckets["enabled"] = _truthy(enabled)
        for key, target in (
            ("min_bucket_reso", "minResolution"),
            ("max_bucket_reso", "maxResolution"),
            ("bucket_reso_steps", "step"),
        ):
            value = _number(self.take(key))
            if value:
                buckets[target] = int(value)
        if buckets:
            spec["buckets"] = buckets

    def _prompts(self, spec: dict[str, Any]) -> None:
        raw = self.take("sample_prompts")
        if not raw:
            return
        if isinstance(raw, str) and re.search(r"\.(txt|toml|json)$", raw.strip()) and "\n" not in raw.strip():
            self.not_carried.append(f"sample_prompts = {raw!r}: a prompts file is not read; list samplePrompts")
            return
        lines = raw if isinstance(raw, list) else str(raw).splitlines()
        prompts: list[str] = []
        scales: list[str] = []
        for line in (str(item).strip() for item in lines):
            if not line or line.startswith("#"):
                continue
            flags = dict(PROMPT_FLAG.findall(" " + line + " "))
            prompts.append(re.split(r"\s--[a-z]+\s", " " + line + " ")[0].strip())
            if "l" in flags and _decimal(_number(flags["l"]) or 0) not in scales and _number(flags["l"]):
                scales.append(_decimal(_number(flags["l"]) or 0))
        spec["samplePrompts"] = prompts[:16]
        if scales:
            spec["gridCfgScales"] = scales[:8]


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in {"true", "1", "yes", "on"}


def _number(value: Any) -> float | None:
    if value in (None, "") or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int:
    number = _number(value)
    return int(number) if number is not None else int(_truthy(value))


def _decimal(value: float) -> str:
    """A float as the API's number string: 0.0001 -> "1e-4", 0.05 -> "0.05", 1.0 -> "1"."""
    text = f"{value:g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}e{int(exponent)}"
    return text


def _same(value: Any, default: Any) -> bool:
    if default is None:
        return False
    if isinstance(default, str):
        return str(value).strip().lower() == default.lower()
    return bool(_number(value) == default)


def _neutral(value: Any) -> bool:
    return value in (None, "", 0, 0.0, False, [], {}) or str(value).strip().lower() in {"false", "0", "none", ""}
