"""Prometheus metrics of one server, in a registry of its own (so several servers can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

FAST_BUCKETS = (0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
SLOW_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "charlora_request_seconds",
            "Latency of image-generation requests, admission to response.",
            ["status"],
            buckets=SLOW_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "charlora_queue_depth", "Generation requests waiting for the pipeline.", registry=registry
        )
        self.in_progress = Gauge(
            "charlora_requests_in_progress", "Admitted generation requests not finished.", registry=registry
        )
        self.lora_loads = Counter(
            "charlora_lora_loads_total",
            "LoRA loads by the tier they came from (remote, disk, cpu; gpu = injected into the pipeline).",
            ["tier"],
            registry=registry,
        )
        self.lora_load_seconds = Histogram(
            "charlora_lora_load_seconds",
            "LoRA load latency by source tier.",
            ["tier"],
            buckets=FAST_BUCKETS,
            registry=registry,
        )
        self.cache_lookups = Counter(
            "charlora_lora_cache_lookups_total",
            "LoRA cache lookups by tier and result.",
            ["tier", "result"],
            registry=registry,
        )
        self.switch_seconds = Histogram(
            "charlora_adapter_switch_seconds",
            "Time to activate a resident adapter.",
            buckets=FAST_BUCKETS,
            registry=registry,
        )
        self.evictions = Counter(
            "charlora_adapter_evictions_total", "Adapters evicted from the GPU tier.", registry=registry
        )
        self.resident = Gauge("charlora_adapters_resident", "Adapters resident on the pipeline.", registry=registry)
        self.images = Counter("charlora_images_generated_total", "Images generated.", registry=registry)
        self.rejected = Counter(
            "charlora_requests_rejected_total",
            "Requests refused before generation, by HTTP status.",
            ["status"],
            registry=registry,
        )
