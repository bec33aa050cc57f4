"""``charlora lint-dataset``: the trainer's own dataset lint, run from a workstation, as a readable report."""

from __future__ import annotations

import statistics
import tempfile
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from charlora.api.characterlora import DatasetSpec
from charlora.storing import S3Settings
from charlora_trainer.datasets import Dataset, fetch_dataset, scan_dataset
from charlora_trainer.failing import name_files
from charlora_trainer.linting import LintReport, lint_dataset


def dataset_uri(target: str) -> str:
    """``s3://...`` and ``file:///...`` as they are; a local path becomes a ``file://`` URI."""
    if target.startswith(("s3://", "file:///")):
        return target
    path = Path(target).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"no such dataset directory: {target}")
    return path.as_uri()


def lint_target(
    target: str,
    *,
    resolution: int,
    min_images: int,
    character_token: str | None,
    caption_extension: str,
    repeats: int,
    settings: S3Settings | None = None,
) -> tuple[Dataset, LintReport, list[tuple[int, int]]]:
    """(the scanned dataset, the lint's report, the readable images' sizes)."""
    spec = DatasetSpec(
        uri=dataset_uri(target),
        caption_extension=caption_extension,
        repeats=repeats,
        min_images=min_images,
        character_token=character_token,
    )
    with tempfile.TemporaryDirectory(prefix="charlora-lint-") as work:
        root = fetch_dataset(spec, workdir=Path(work), settings=settings)
        dataset = scan_dataset(root, spec)
        report = lint_dataset(dataset, resolution=resolution, min_images=min_images, character_token=character_token)
        sizes = _sizes(dataset)
    return dataset, report, sizes


def _sizes(dataset: Dataset) -> list[tuple[int, int]]:
    sizes = []
    for item in dataset.items:
        try:
            with Image.open(item.image) as image:  # reads the header only
                sizes.append(image.size)
        except (OSError, UnidentifiedImageError):
            continue
    return sizes


def render_lint(dataset: Dataset, report: LintReport, *, sizes: list[tuple[int, int]]) -> str:
    lines = [
        f"dataset:   {report.dataset_uri}",
        f"images:    {report.images}   samples per epoch (with repeats): {report.samples_per_epoch}   "
        f"training resolution: {report.resolution} px",
        "repeat folders:",
    ]
    folders: Counter[tuple[str, int]] = Counter()
    for item in dataset.items:
        folder = item.relative.split("/", 1)[0] + "/" if "/" in item.relative else "(root)"
        folders[(folder, item.repeats)] += 1
    for (folder, repeats), count in sorted(folders.items()):
        lines.append(f"  {folder:<24} {count:>5} images x {repeats:<3} = {count * repeats}")
    if not folders:
        lines.append("  (none)")
    if sizes:
        by_area = sorted(sizes, key=lambda s: s[0] * s[1])
        median = by_area[len(by_area) // 2]
        lines.append(
            f"image sizes: smallest {by_area[0][0]}x{by_area[0][1]}, median {median[0]}x{median[1]}, "
            f"largest {by_area[-1][0]}x{by_area[-1][1]}, "
            f"{statistics.mean(w / h for w, h in sizes):.2f} mean aspect (w/h)"
        )
    missing = sum(1 for item in dataset.items if item.caption is None)
    empty = sum(1 for item in dataset.items if item.caption == "")
    lines.append(f"captions:  {missing} missing, {empty} empty")
    for title, problems in (
        ("errors (the trainer refuses this dataset)", report.errors),
        ("warnings", report.warnings),
    ):
        if problems:
            lines.append(f"{title}:")
            for problem in problems:
                files = f": {name_files(problem.files)}" if problem.files else ""
                lines.append(f"  - {problem.code}: {problem.message}{files}")
    lines.append("result:    " + ("OK" if report.ok else f"REFUSED ({len(report.errors)} fatal problems)"))
    return "\n".join(lines)
