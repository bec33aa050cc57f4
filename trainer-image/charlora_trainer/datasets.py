"""The training dataset: fetched from s3:// (or read in place from file:///) and scanned in the Kohya layout.

Layout: ``N_name/`` folders whose images are repeated N times per epoch, each image with a same-named caption file
(``.txt`` unless configured); images directly in the root (a flat folder) use the configured repeats. Other folders
are reported by the lint and ignored. The source is never written to: caches live in the trainer's work directory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from charlora.api.characterlora import DatasetSpec
from charlora.storing import S3Settings, StorageError, file_path, open_store
from charlora_trainer.failing import BadInput

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class DatasetItem:
    """One image of the dataset with its caption (None when the caption file is missing)."""

    image: Path
    relative: str
    caption: str | None
    repeats: int


@dataclass(frozen=True)
class Dataset:
    root: Path
    uri: str
    items: list[DatasetItem]
    ignored_folders: list[str]

    @property
    def samples_per_epoch(self) -> int:
        return sum(item.repeats for item in self.items)


def fetch_dataset(spec: DatasetSpec, *, workdir: Path, settings: S3Settings | None = None) -> Path:
    """A local directory holding the dataset: the file:/// path itself, or a download of the s3:// prefix."""
    if spec.uri.startswith("file://"):
        root = file_path(spec.uri)
        if not root.is_dir():
            raise BadInput(f"The dataset {spec.uri} is not a directory")
        return root
    store = open_store(spec.uri, settings)
    prefix = spec.uri if spec.uri.endswith("/") else spec.uri + "/"
    target = workdir / "dataset"
    try:
        objects = list(store.list(prefix))
        for info in objects:
            relative = info.uri.removeprefix(prefix)
            local = target / relative
            if not local.is_file() or local.stat().st_size != info.size:
                store.download_file(info.uri, local)
    except StorageError as err:
        # A missing bucket or a denied read is a configuration problem, not a transient one (botocore retried).
        raise BadInput(f"Could not read the dataset {spec.uri}: {err}") from err
    target.mkdir(parents=True, exist_ok=True)
    return target


def _read_caption(path: Path) -> str | None:
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_dataset(root: Path, spec: DatasetSpec) -> Dataset:
    """Lists the images of ``root`` in the Kohya layout with their captions and repeat counts."""
    items: list[DatasetItem] = []
    ignored: list[str] = []

    def add(folder: Path, repeats: int) -> None:
        for image in _images_in(folder):
            caption = _read_caption(image.with_suffix(spec.caption_extension))
            items.append(DatasetItem(image, image.relative_to(root).as_posix(), caption, repeats))

    add(root, spec.repeats)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEAT_FOLDER.match(folder.name)
        if match and int(match.group(1)) > 0:
            add(folder, int(match.group(1)))
        else:
            ignored.append(folder.name + "/")
    return Dataset(root=root, uri=spec.uri, items=items, ignored_folders=ignored)
