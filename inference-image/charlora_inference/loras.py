"""The LoRA tiers below the GPU: verified state dicts in CPU memory, a local disk cache, object storage as origin.

A LoRA enters the server only through ``LoRAFetcher.fetch``: it reads the version's manifest from the origin,
checks that the base model matches the server's, that the table's sha256 is the manifest's, downloads the file into
the disk cache and hashes it before parsing it with safetensors (never pickle). The adapter tier on the GPU lives
with the pipeline (``pipelines.AdapterSet``); this module never touches a model.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from charlora.api.serving import ServingEntry
from charlora.artifacts import LORA_DIFFUSERS, MANIFEST, Manifest
from charlora.storing import NotFound, S3Settings, StorageError, open_store
from charlora_inference.metrics import Metrics

log = logging.getLogger(__name__)

Tier = Literal["gpu", "cpu", "disk", "remote"]
MANIFEST_CACHE_SIZE = 4096
StateDict = dict[str, torch.Tensor]


class LoRARefused(Exception):
    """The LoRA must not be served (checksum, format or base-model mismatch); the message says why."""


class LoRAUnavailable(Exception):
    """The LoRA could not be fetched now (storage unreachable or the version does not exist)."""


class VersionNotFound(LoRAUnavailable):
    """The requested version has no manifest: it does not exist."""


@dataclass(frozen=True)
class BaseModel:
    """The base model a server runs; every LoRA must belong to it."""

    family: Literal["sd15", "sdxl"]
    version: str


@dataclass(frozen=True)
class FetchedLoRA:
    entry: ServingEntry
    state_dict: StateDict
    size: int
    tier: Tier
    """Where it came from on this fetch: cpu, disk or remote."""
    seconds: float


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_lora_file(name: str, data: bytes) -> StateDict:
    """Parses a LoRA file, refusing anything that is not safetensors (pickled .ckpt/.pt/.bin can run code)."""
    if not name.endswith(".safetensors"):
        raise LoRARefused(f"{name}: only .safetensors LoRAs are served")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise LoRARefused(f"{name}: not a valid safetensors file ({err})") from err
    if not tensors:
        raise LoRARefused(f"{name}: holds no tensors")
    return tensors


def check_base_model(entry: ServingEntry, base: BaseModel) -> None:
    if (entry.base_model_family, entry.base_model_version) != (base.family, base.version):
        raise LoRARefused(
            f"{entry.key} {entry.version} belongs to base model {entry.base_model_family}/{entry.base_model_version}, "
            f"this server runs {base.family}/{base.version}"
        )


def check_manifest(entry: ServingEntry, manifest: Manifest, *, base: BaseModel) -> int:
    """Checks the table entry against the version's manifest; returns the expected file size."""
    if (manifest.base_model.family, manifest.base_model.version) != (base.family, base.version):
        raise LoRARefused(
            f"{entry.key} {entry.version}: manifest names base model "
            f"{manifest.base_model.family}/{manifest.base_model.version}, this server runs {base.family}/{base.version}"
        )
    listed = manifest.entry(entry.lora_path)
    if listed is None:
        raise LoRARefused(f"{entry.key} {entry.version}: manifest does not list {entry.lora_path}")
    if listed.sha256 != entry.sha256:
        raise LoRARefused(
            f"{entry.key} {entry.version}: serving table sha256 {entry.sha256[:12]}... differs from the manifest's "
            f"{listed.sha256[:12]}... for {entry.lora_path}"
        )
    return listed.size


@dataclass
class _CpuItem:
    state_dict: StateDict
    size: int


@dataclass
class LoRAFetcher:
    """Fetches verified LoRA state dicts through the CPU and disk tiers from object storage."""

    base: BaseModel
    cache_dir: Path
    cpu_cache_bytes: int = 2 << 30
    disk_cache_bytes: int = 20 << 30
    s3: S3Settings | None = None
    metrics: Metrics | None = None
    _cpu: OrderedDict[str, _CpuItem] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # One lock per sha256, so two requests for the same cold LoRA download it once.
    _fetching: dict[str, threading.Lock] = field(default_factory=dict)
    _manifests: OrderedDict[str, Manifest] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def disk_path(self, sha256: str) -> Path:
        return self.cache_dir / f"{sha256}.safetensors"

    def where(self, entry: ServingEntry) -> Tier:
        """The cheapest tier below the GPU that holds the entry's file (without fetching anything)."""
        with self._lock:
            if entry.sha256 in self._cpu:
                return "cpu"
        return "disk" if self.disk_path(entry.sha256).is_file() else "remote"

    def fetch(self, entry: ServingEntry) -> FetchedLoRA:
        """The entry's verified state dict; raises LoRARefused or LoRAUnavailable."""
        check_base_model(entry, self.base)
        started = time.perf_counter()
        with self._lock:
            lock = self._fetching.setdefault(entry.sha256, threading.Lock())
        with lock:
            state_dict, size, tier = self._fetch_locked(entry)
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.cache_lookups.labels(tier="cpu", result="hit" if tier == "cpu" else "miss").inc()
            if tier != "cpu":
                self.metrics.cache_lookups.labels(tier="disk", result="hit" if tier == "disk" else "miss").inc()
                self.metrics.lora_loads.labels(tier=tier).inc()
                self.metrics.lora_load_seconds.labels(tier=tier).observe(seconds)
        return FetchedLoRA(entry=entry, state_dict=state_dict, size=size, tier=tier, seconds=seconds)

    def _fetch_locked(self, entry: ServingEntry) -> tuple[StateDict, int, Tier]:
        with self._lock:
            item = self._cpu.get(entry.sha256)
            if item is not None:
                self._cpu.move_to_end(entry.sha256)
                return item.state_dict, item.size, "cpu"
        tier: Tier = "disk"
        data = self._read_disk(entry)
        if data is None:
            tier = "remote"
            data = self._download(entry)
        state_dict = parse_lora_file(entry.lora_path, data)
        self._remember(entry.sha256, state_dict, size=len(data))
        return state_dict, len(data), tier

    def _read_disk(self, entry: ServingEntry) -> bytes | None:
        path = self.disk_path(entry.sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if sha256_hex(data) != entry.sha256:
            # A corrupted cache file is not the LoRA's fault: drop it and fetch from the origin again.
            log.warning("Dropped corrupted cache file %s", path)
            path.unlink(missing_ok=True)
            return None
        path.touch()  # mtime orders the disk LRU
        return data

    def read_manifest(self, manifest_uri: str) -> Manifest:
        """A version's manifest. Cached: a version is immutable once its manifest exists (it is written last)."""
        with self._lock:
            cached = self._manifests.get(manifest_uri)
        if cached is not None:
            return cached
        manifest = self._read_manifest(manifest_uri)
        with self._lock:
            self._manifests[manifest_uri] = manifest
            while len(self._manifests) > MANIFEST_CACHE_SIZE:
                self._manifests.popitem(last=False)
        return manifest

    def _read_manifest(self, manifest_uri: str) -> Manifest:
        try:
            raw = open_store(manifest_uri, self.s3).read_bytes(manifest_uri)
        except NotFound as err:
            raise VersionNotFound(f"{manifest_uri} does not exist") from err
        except StorageError as err:
            raise LoRAUnavailable(str(err)) from err
        try:
            return Manifest.model_validate_json(raw)
        except ValidationError as err:
            raise LoRARefused(f"{manifest_uri}: invalid manifest ({err.error_count()} errors)") from err

    def _download(self, entry: ServingEntry) -> bytes:
        manifest = self.read_manifest(entry.manifest_uri)
        expected_size = check_manifest(entry, manifest, base=self.base)
        partial = self.cache_dir / f".{entry.sha256}.download"
        try:
            open_store(entry.lora_uri, self.s3).download_file(entry.lora_uri, partial)
            data = partial.read_bytes()
        except NotFound as err:
            raise LoRARefused(f"{entry.lora_uri}: listed in the manifest but missing") from err
        except StorageError as err:
            raise LoRAUnavailable(str(err)) from err
        digest = sha256_hex(data)
        if digest != entry.sha256 or len(data) != expected_size:
            partial.unlink(missing_ok=True)
            raise LoRARefused(
                f"{entry.lora_uri}: sha256 {digest[:12]}... ({len(data)} bytes) does not match the manifest's "
                f"{entry.sha256[:12]}... ({expected_size} bytes)"
            )
        partial.replace(self.disk_path(entry.sha256))
        self._trim_disk(keep=entry.sha256)
        return data

    def _remember(self, sha256: str, state_dict: StateDict, *, size: int) -> None:
        with self._lock:
            self._cpu[sha256] = _CpuItem(state_dict, size)
            self._cpu.move_to_end(sha256)
            total = sum(item.size for item in self._cpu.values())
            while total > self.cpu_cache_bytes and len(self._cpu) > 1:
                _, evicted = self._cpu.popitem(last=False)
                total -= evicted.size

    def _trim_disk(self, *, keep: str) -> None:
        stats = []
        for path in self.cache_dir.glob("*.safetensors"):
            try:
                stats.append((path.stat().st_mtime, path.stat().st_size, path))
            except FileNotFoundError:  # trimmed by a concurrent download meanwhile
                continue
        total = sum(size for _, size, _ in stats)
        for _, size, path in sorted(stats):
            if total <= self.disk_cache_bytes:
                break
            if path.stem != keep:
                total -= size
                path.unlink(missing_ok=True)

    def drop_cpu(self, sha256: str) -> None:
        """Forgets a state dict (tests and benchmarks use this to measure the disk tier)."""
        with self._lock:
            self._cpu.pop(sha256, None)

    def entry_for_version(self, entry: ServingEntry, version: str) -> ServingEntry:
        """The table entry for another version of the same character, as its manifest describes it."""
        artifact_uri = f"{entry.artifact_uri.rstrip('/').rsplit('/', 1)[0]}/{version}/"
        manifest = self.read_manifest(f"{artifact_uri}{MANIFEST}")
        listed = manifest.entry(LORA_DIFFUSERS)
        if listed is None:
            raise LoRARefused(f"{artifact_uri}: manifest does not list {LORA_DIFFUSERS}")
        return entry.model_copy(
            update={
                "version": version,
                "epoch": None,
                "artifact_uri": artifact_uri,
                "sha256": listed.sha256,
                "base_model_family": manifest.base_model.family,
                "base_model_version": manifest.base_model.version,
            }
        )
