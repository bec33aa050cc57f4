"""Generated Kohya-layout datasets for tests, benchmarks and the demo: distinct random images with captions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CAPTIONS = ["a person standing in a park", "a person sitting on a red chair", "a portrait in soft light"]


def write_image(path: Path, *, seed: int, size: tuple[int, int] = (64, 64)) -> Path:
    """A smooth random picture (an upscaled 6x6 colour grid): distinct seeds give visibly distinct images."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(cells).resize(size, Image.Resampling.BILINEAR).save(path)
    return path


def write_kohya_dataset(
    root: Path,
    *,
    folders: dict[str, int] | None = None,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
) -> Path:
    """``{"2_anna": 6}`` -> root/2_anna/img000.png + img000.txt ... (6 images repeated twice)."""
    folders = folders or {"2_anna": 6, "1_anna": 6}
    index = 0
    for folder, count in folders.items():
        for _ in range(count):
            image = write_image(root / folder / f"img{index:03d}.png", seed=seed * 1000 + index, size=size)
            image.with_suffix(".txt").write_text(CAPTIONS[index % len(CAPTIONS)] + f", tag{index}")
            index += 1
    return root


def upload_tree(s3: Any, bucket: str, local: Path, prefix: str) -> str:
    """Copies a local directory to ``s3://<bucket>/<prefix>/`` with a boto3 client; returns that URI."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}")
    return f"s3://{bucket}/{prefix.strip('/')}/"
