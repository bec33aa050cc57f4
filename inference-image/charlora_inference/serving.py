"""The server's core, below HTTP: settings, the serving table, the LoRA tiers, the pipeline and its worker, readiness.

Readiness: the base is loaded, the table has synced once, and every pinned character has been made resident (or
refused for good, e.g. a checksum mismatch: one broken artifact must not take a whole replica out of service; the
refusal shows in ``/readyz`` and ``/v1/characters``). A pinned LoRA that cannot be fetched yet keeps it not ready.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from charlora.api.serving import ServingEntry
from charlora.storing import S3Settings
from charlora_inference.loras import BaseModel, FetchedLoRA, LoRAFetcher, LoRARefused, LoRAUnavailable, Tier
from charlora_inference.metrics import Metrics
from charlora_inference.pipelines import FREEU_DEFAULTS, BasePipeline, FreeU, PipelineWorker, adapter_name
from charlora_inference.tables import ServingTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    base_dir: Path
    base_family: Literal["sd15", "sdxl"]
    base_version: str
    cache_dir: Path
    device: str = "cpu"
    dtype: str = "float32"
    scheduler: str | None = None
    freeu_default: FreeU | None = None
    resident_slots: int = 8
    cpu_cache_bytes: int = 2 << 30
    disk_cache_bytes: int = 20 << 30
    max_queue: int = 32
    max_images: int = 8
    max_pixels: int = 2048 * 2048
    s3: S3Settings | None = None
    base_uri: str = ""


@dataclass
class InferenceServer:
    settings: ServerSettings
    table: ServingTable
    metrics: Metrics = field(default_factory=Metrics)
    refused: dict[str, str] = field(default_factory=dict)
    """sha256 -> why it was refused (pinned preloads; cleared when the table changes that entry)."""
    ready: threading.Event = field(default_factory=threading.Event)
    waiting_for: list[str] = field(default_factory=lambda: ["base model"])
    pipeline: BasePipeline | None = None
    worker: PipelineWorker | None = None
    fetcher: LoRAFetcher | None = None
    _wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _preloader: threading.Thread | None = None

    @property
    def base(self) -> BaseModel:
        return BaseModel(self.settings.base_family, self.settings.base_version)

    def is_pinned(self, sha256: str) -> bool:
        return sha256 in self.table.pinned_shas()

    def start(self) -> InferenceServer:
        """Loads the base (blocking) and starts the worker and the pinned-LoRA preloader."""
        settings = self.settings
        self.fetcher = LoRAFetcher(
            base=self.base,
            cache_dir=settings.cache_dir,
            cpu_cache_bytes=settings.cpu_cache_bytes,
            disk_cache_bytes=settings.disk_cache_bytes,
            s3=settings.s3,
            metrics=self.metrics,
        )
        self.pipeline = BasePipeline(
            path=settings.base_dir,
            base=self.base,
            device=settings.device,
            dtype=settings.dtype,
            scheduler_name=settings.scheduler,
            resident_slots=settings.resident_slots,
            is_pinned=self.is_pinned,
            metrics=self.metrics,
            freeu_default=settings.freeu_default,
        ).load()
        self.worker = PipelineWorker(max_queue=settings.max_queue, metrics=self.metrics)
        self.table.add_listener(lambda changes: self._wake.set())
        self._preloader = threading.Thread(target=self._preload_loop, name="pinned-preloader", daemon=True)
        self._preloader.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.worker is not None:
            self.worker.stop()

    def default_freeu(self) -> FreeU | None:
        return self.settings.freeu_default

    def family_freeu(self) -> FreeU:
        return FreeU(*FREEU_DEFAULTS[self.settings.base_family])

    def tier_of(self, entry: ServingEntry) -> Tier:
        assert self.pipeline is not None
        assert self.pipeline.adapters is not None
        assert self.fetcher is not None
        if adapter_name(entry.sha256) in self.pipeline.adapters.snapshot:
            return "gpu"
        return self.fetcher.where(entry)

    def _preload_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            if not self.table.synced.is_set():
                self.waiting_for = ["serving table"]
                self.table.synced.wait(0.5)
                continue
            waiting = self._preload_pinned()
            self.waiting_for = waiting
            if not waiting:
                self.ready.set()
            # Transient failures retry every two seconds; otherwise sleep until the table changes.
            self._wake.wait(2.0 if waiting else None)

    def _ensure_resident(self, lora: FetchedLoRA) -> Callable[[], str]:
        adapters = self.pipeline.adapters if self.pipeline is not None else None
        assert adapters is not None
        return lambda: adapters.ensure(lora)

    def _preload_pinned(self) -> list[str]:
        assert self.fetcher is not None
        assert self.worker is not None
        waiting: list[str] = []
        pinned = self.table.pinned()
        for sha in list(self.refused):
            if not any(entry.sha256 == sha for entry in pinned):
                del self.refused[sha]
        for entry in pinned:
            if entry.sha256 in self.refused or self.tier_of(entry) == "gpu":
                continue
            try:
                lora = self.fetcher.fetch(entry)
                self.worker.submit(self._ensure_resident(lora), request=False).result()
                log.info("Loaded pinned LoRA %s %s", entry.key, entry.version)
            except LoRARefused as err:
                self.refused[entry.sha256] = str(err)
                log.error("Refused pinned LoRA %s %s: %s", entry.key, entry.version, err)
            except LoRAUnavailable as err:
                waiting.append(f"pinned LoRA {entry.key} {entry.version} ({err})")
        return waiting
