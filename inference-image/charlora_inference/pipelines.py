"""The one base pipeline of a server, its resident adapters (the GPU tier) and the worker that serialises its use.

A diffusers pipeline's adapter state is global, so every use of the pipeline — injecting or evicting an adapter,
switching the active one, FreeU, generating — runs on one worker thread, one job at a time; concurrent requests for
different characters can therefore never see each other's adapter. Switching between resident adapters flips the
active adapter and scale on the (cached) list of LoRA layers: no weights move.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.utils import logging as diffusers_logging
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from charlora_inference.loras import BaseModel, FetchedLoRA, LoRARefused
from charlora_inference.metrics import Metrics

log = logging.getLogger(__name__)

SCHEDULERS: dict[str, Any] = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FREEU_DEFAULTS = {"sd15": (0.9, 0.2, 1.5, 1.6), "sdxl": (0.6, 0.4, 1.1, 1.2)}


@dataclass(frozen=True)
class FreeU:
    s1: float
    s2: float
    b1: float
    b2: float


def adapter_name(sha256: str) -> str:
    """Adapters are named by content: two table rows with the same file share one resident adapter."""
    return f"lora_{sha256[:24]}"


@dataclass(frozen=True)
class GenerationJob:
    """One admitted request, with the LoRA it resolved at admission (so a table change cannot alter it)."""

    lora: FetchedLoRA
    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    lora_scale: float
    freeu: FreeU | None


@dataclass
class AdapterSet:
    """The resident adapters of a pipeline: pinned ones plus at most ``slots`` others, least recently used first out.

    Only the worker thread calls it.
    """

    pipe: Any
    slots: int
    is_pinned: Callable[[str], bool]
    metrics: Metrics | None = None
    resident: OrderedDict[str, str] = field(default_factory=OrderedDict)
    """adapter name -> sha256, least recently used first."""
    active: tuple[str, float] | None = None
    snapshot: frozenset[str] = frozenset()
    """The resident names, replaced (never mutated) by the worker, for other threads to read."""
    _layers: list[BaseTunerLayer] = field(default_factory=list)

    def _components(self) -> list[Any]:
        return [
            getattr(self.pipe, name) for name in ("unet", "text_encoder", "text_encoder_2") if hasattr(self.pipe, name)
        ]

    def _refresh_layers(self) -> None:
        self._layers = [
            module
            for component in self._components()
            if component is not None
            for module in component.modules()
            if isinstance(module, BaseTunerLayer)
        ]

    def ensure(self, lora: FetchedLoRA) -> str:
        """Makes the LoRA resident (evicting the least recently used unpinned adapter if needed); returns its name."""
        name = adapter_name(lora.entry.sha256)
        if name in self.resident:
            self.resident.move_to_end(name)
            return name
        self._evict_for(name)
        started = time.perf_counter()
        # diffusers converts kohya and PEFT keys alike; a copy keeps the CPU tier's tensors untouched.
        try:
            self.pipe.load_lora_weights(dict(lora.state_dict), adapter_name=name)
        except Exception as err:
            # Keys that match no module of this base, or shapes that do not fit: the file is no LoRA for this base.
            with contextlib.suppress(Exception):
                self.pipe.delete_adapters(name)
            self._refresh_layers()
            raise LoRARefused(f"{lora.entry.key} {lora.entry.version}: does not fit the base model ({err})") from err
        self.resident[name] = lora.entry.sha256
        self.snapshot = frozenset(self.resident)
        self.active = None
        self._refresh_layers()
        if self.metrics is not None:
            self.metrics.lora_loads.labels(tier="gpu").inc()
            self.metrics.lora_load_seconds.labels(tier="gpu").observe(time.perf_counter() - started)
            self.metrics.resident.set(len(self.resident))
        return name

    def _evict_for(self, incoming: str) -> None:
        unpinned = [name for name, sha in self.resident.items() if not self.is_pinned(sha)]
        while len(unpinned) >= self.slots and unpinned:
            victim = unpinned.pop(0)
            self.pipe.delete_adapters(victim)
            del self.resident[victim]
            self.snapshot = frozenset(self.resident)
            # peft re-points layers whose active adapter was deleted: re-activate before the next use.
            self.active = None
            if self.metrics is not None:
                self.metrics.evictions.inc()
            log.info("Evicted adapter %s to make room for %s", victim, incoming)

    def activate(self, name: str, scale: float) -> float:
        """Makes ``name`` the only active adapter at ``scale``; returns the seconds it took (0 when already so)."""
        if self.active == (name, scale):
            return 0.0
        started = time.perf_counter()
        for layer in self._layers:
            # Assigning the active adapter directly: peft's set_adapter also flips requires_grad on every adapter's
            # parameters, which dominates the switch cost and means nothing under inference_mode. A layer that lacks
            # the adapter (e.g. a text encoder the LoRA does not train) then runs without a LoRA, as it should.
            layer._active_adapter = [name]
            set_scale = getattr(layer, "set_scale", None)
            if set_scale is not None:
                set_scale(name, scale)
        self.active = (name, scale)
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.switch_seconds.observe(seconds)
        return seconds

    def deactivate(self) -> None:
        for layer in self._layers:
            layer._active_adapter = []
        self.active = None

    def names(self) -> list[str]:
        return list(self.resident)


def detect_family(pipe: Any) -> Literal["sd15", "sdxl"]:
    return "sdxl" if "XL" in type(pipe).__name__ else "sd15"


@dataclass
class BasePipeline:
    """One base model loaded once, with its scheduler and precision pinned."""

    path: Path
    base: BaseModel
    device: str
    dtype: str
    scheduler_name: str | None
    resident_slots: int
    is_pinned: Callable[[str], bool]
    metrics: Metrics | None = None
    freeu_default: FreeU | None = None
    pipe: Any = None
    adapters: AdapterSet | None = None
    scheduler_class: str = ""

    def load(self) -> BasePipeline:
        diffusers_logging.set_verbosity_error()  # LoRA loading warns about keys other components lack, per load
        pipe = DiffusionPipeline.from_pretrained(str(self.path), dtype=DTYPES[self.dtype])  # type: ignore[no-untyped-call]
        family = detect_family(pipe)
        if family != self.base.family:
            raise ValueError(f"{self.path} holds a {family} pipeline; the server was told {self.base.family}")
        if self.scheduler_name is not None:
            pipe.scheduler = SCHEDULERS[self.scheduler_name].from_config(pipe.scheduler.config)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.scheduler_class = type(pipe.scheduler).__name__
        self.adapters = AdapterSet(pipe, self.resident_slots, self.is_pinned, self.metrics)
        return self

    def _set_freeu(self, freeu: FreeU | None) -> None:
        if freeu is None:
            self.pipe.disable_freeu()
        else:
            self.pipe.enable_freeu(s1=freeu.s1, s2=freeu.s2, b1=freeu.b1, b2=freeu.b2)

    def generate(self, job: GenerationJob) -> list[Image.Image]:
        """Runs one job and returns its images."""
        images: list[Image.Image] = self.render(job, output_type="pil")
        return images

    def render(self, job: GenerationJob, *, output_type: Literal["pil", "np"]) -> list[Any]:
        """Runs one job (on the worker thread). Image i uses seed + i with its own generator and is always computed
        at batch size 1, so its numbers do not depend on n: kernels give different results for different batch
        shapes, so per-image generators alone would not make image 0 of n = 4 equal image 0 of n = 1."""
        assert self.adapters is not None
        name = self.adapters.ensure(job.lora)
        self.adapters.activate(name, job.lora_scale)
        self._set_freeu(job.freeu)
        images: list[Any] = []
        with torch.inference_mode():
            for index in range(job.n):
                generator = torch.Generator(device=self.device).manual_seed(job.seed + index)
                result = self.pipe(
                    prompt=job.prompt,
                    negative_prompt=job.negative_prompt or None,
                    num_inference_steps=job.steps,
                    guidance_scale=job.cfg_scale,
                    width=job.width,
                    height=job.height,
                    num_images_per_prompt=1,
                    generator=generator,
                    output_type=output_type,
                )
                images.append(result.images[0])
        if self.metrics is not None:
            self.metrics.images.inc(len(images))
        return images


class QueueFull(Exception):
    """The bounded request queue is full (HTTP 429)."""


@dataclass
class _Task:
    run: Callable[[], Any]
    future: Future[Any]
    counted: bool


class PipelineWorker:
    """One thread that owns the pipeline. Requests wait in a bounded queue; internal tasks (preloads) skip the bound."""

    def __init__(self, *, max_queue: int, metrics: Metrics | None = None) -> None:
        self.max_queue = max_queue
        self.metrics = metrics
        self._tasks: deque[_Task] = deque()
        self._waiting_requests = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="pipeline-worker", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[], Any], *, request: bool = True) -> Future[Any]:
        future: Future[Any] = Future()
        with self._cond:
            if self._stopped:
                raise QueueFull("the server is shutting down")
            if request and self._waiting_requests >= self.max_queue:
                raise QueueFull(f"the queue holds {self._waiting_requests} requests, its limit")
            self._tasks.append(_Task(run, future, request))
            if request:
                self._waiting_requests += 1
                self._gauge()
            self._cond.notify()
        return future

    def full(self) -> bool:
        with self._cond:
            return self._waiting_requests >= self.max_queue

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._waiting_requests)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._tasks and not self._stopped:
                    self._cond.wait()
                if self._stopped and not self._tasks:
                    return
                task = self._tasks.popleft()
                if task.counted:
                    self._waiting_requests -= 1
                    self._gauge()
            if not task.future.set_running_or_notify_cancel():
                continue
            try:
                task.future.set_result(task.run())
            except Exception as err:  # noqa: BLE001 - handed to the waiting request, which maps it to a status
                task.future.set_exception(err)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
