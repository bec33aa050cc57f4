"""The dataset lint: runs before any GPU work, writes lint.json, and refuses a dataset that cannot train well.

Fatal (exit with the bad-input code): no images, an image without a caption, an unreadable image, an image too small
for the training resolution, fewer images than the configured minimum, near-duplicate images. Warnings: captions that
name the character token (describe the scene, not the character), empty captions, ignored folders.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import Field

from charlora.api.base import StatusModel
from charlora_trainer.datasets import Dataset, DatasetItem
from charlora_trainer.failing import name_files

# An image may be upscaled by at most this factor (per side, by area) to reach the training resolution.
MAX_UPSCALE = 2.0
# dHash bits that may differ between two images still called near-duplicates (of 64).
DUPLICATE_HAMMING = 4

Code = Literal[
    "no_images",
    "missing_caption",
    "unreadable_image",
    "image_too_small",
    "too_few_images",
    "near_duplicates",
    "caption_names_character",
    "empty_caption",
    "ignored_folder",
]


class LintProblem(StatusModel):
    code: Code
    message: str
    files: list[str] = Field(default_factory=list, description="Paths relative to the dataset root.")


class LintReport(StatusModel):
    """lint.json: what the lint found. ``ok`` is false when any error is present."""

    dataset_uri: str
    images: int
    samples_per_epoch: int
    resolution: int
    errors: list[LintProblem] = Field(default_factory=list)
    warnings: list[LintProblem] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def failure_message(self) -> str:
        """The termination message: every error with the files it names."""
        lines = [f"The dataset {self.dataset_uri} failed the lint ({len(self.errors)} problems):"]
        lines += [f"- {p.code}: {p.message}" + (f": {name_files(p.files)}" if p.files else "") for p in self.errors]
        return "\n".join(lines)


def _dhash(image: Image.Image) -> int:
    """64-bit difference hash: robust to resizing and re-encoding, so re-saved copies collide."""
    small = image.convert("L").resize((9, 8), Image.Resampling.BILINEAR)
    pixels = small.tobytes()  # mode L: one byte per pixel, row by row
    bits = 0
    for row in range(8):
        for col in range(8):
            bits = (bits << 1) | int(pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return bits


def _open(item: DatasetItem) -> tuple[tuple[int, int], int] | None:
    """(size, dhash) of a readable image, None for a corrupt or unreadable one."""
    try:
        with Image.open(item.image) as probe:
            probe.verify()  # checks the container; load() below checks the pixel data
        with Image.open(item.image) as image:
            image.load()
            return image.size, _dhash(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None


def _duplicate_groups(hashes: Iterable[tuple[str, int]]) -> list[list[str]]:
    groups: list[list[str]] = []
    seen: list[tuple[str, int]] = []
    for name, value in hashes:
        for group_head, head_hash in seen:
            if (value ^ head_hash).bit_count() <= DUPLICATE_HAMMING:
                next(g for g in groups if g[0] == group_head).append(name)
                break
        else:
            seen.append((name, value))
            groups.append([name])
    return [g for g in groups if len(g) > 1]


def _warnings(dataset: Dataset, character_token: str | None) -> list[LintProblem]:
    warnings: list[LintProblem] = []
    items = dataset.items
    if character_token:
        # Whole words only: the token "ann" must not match "annual".
        pattern = re.compile(rf"\b{re.escape(character_token)}\b", re.IGNORECASE)
        named = [i.relative for i in items if i.caption and pattern.search(i.caption)]
        if named:
            warnings.append(
                LintProblem(
                    code="caption_names_character",
                    message=f"{len(named)} captions name the character {character_token!r}: describe the scene, "
                    "not the character",
                    files=named,
                )
            )
    if empty := [i.relative for i in items if i.caption == ""]:
        warnings.append(LintProblem(code="empty_caption", message=f"{len(empty)} captions are empty", files=empty))
    if dataset.ignored_folders:
        warnings.append(
            LintProblem(
                code="ignored_folder",
                message="folders not named N_name/ (N = repeats) were ignored",
                files=dataset.ignored_folders,
            )
        )
    return warnings


def lint_dataset(dataset: Dataset, *, resolution: int, min_images: int, character_token: str | None) -> LintReport:
    errors: list[LintProblem] = []
    items = dataset.items
    if not items:
        errors.append(
            LintProblem(
                code="no_images", message="no images (png, jpg, jpeg, webp, bmp) in the root or N_name/ folders"
            )
        )
    if missing := [i.relative for i in items if i.caption is None]:
        errors.append(
            LintProblem(code="missing_caption", message=f"{len(missing)} images have no caption file", files=missing)
        )
    unreadable: list[str] = []
    small: list[str] = []
    hashes: list[tuple[str, int]] = []
    smallest_side = resolution / MAX_UPSCALE
    for item in items:
        opened = _open(item)
        if opened is None:
            unreadable.append(item.relative)
            continue
        (width, height), digest = opened
        hashes.append((item.relative, digest))
        if math.sqrt(width * height) < smallest_side:
            small.append(f"{item.relative} ({width}x{height})")
    if unreadable:
        errors.append(
            LintProblem(
                code="unreadable_image",
                message=f"{len(unreadable)} images are corrupt or not readable as images",
                files=unreadable,
            )
        )
    if small:
        errors.append(
            LintProblem(
                code="image_too_small",
                message=f"{len(small)} images are smaller than {smallest_side:.0f} px (the training resolution "
                f"{resolution} px allows at most {MAX_UPSCALE:g}x upscaling)",
                files=small,
            )
        )
    if items and len(items) < min_images:
        errors.append(
            LintProblem(
                code="too_few_images",
                message=f"{len(items)} images, fewer than the minimum of {min_images} (dataset.minImages)",
            )
        )
    for group in _duplicate_groups(hashes):
        errors.append(
            LintProblem(
                code="near_duplicates",
                message=f"{len(group)} images are near-duplicates of each other (keep one)",
                files=group,
            )
        )
    warnings = _warnings(dataset, character_token)
    return LintReport(
        dataset_uri=dataset.uri,
        images=len(items),
        samples_per_epoch=dataset.samples_per_epoch,
        resolution=resolution,
        errors=errors,
        warnings=warnings,
    )
