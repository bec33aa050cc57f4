"""Smoke run of bench/inference.py's measurements on the tiny pipeline: the resident switch must beat the naive
load + unload path by the issue's 100x, and the cold-load rows must come out as numbers."""

from __future__ import annotations

import re
from pathlib import Path

from bench.inference import BASE, bench_cold_load, bench_switch

from charlora_inference.loras import LoRAFetcher
from charlora_inference.pipelines import BasePipeline
from tests.inference.lorafiles import World


def ratio(cell: str) -> float:
    found = re.match(r"([0-9.]+)x", cell)
    assert found is not None, cell
    return float(found.group(1))


def test_switch_is_at_least_100x_faster_than_load_and_unload(world: World, tmp_path: Path) -> None:
    fetcher = LoRAFetcher(base=BASE, cache_dir=tmp_path / "cache", s3=world.s3)
    loras = [
        fetcher.fetch(world.publish("bench", f"c{seed}", version="v1", lora=data, base_version=BASE.version))
        for seed, data in world.loras.items()
    ]
    pipeline = BasePipeline(
        path=world.base,
        base=BASE,
        device="cpu",
        dtype="float32",
        scheduler_name="euler",
        resident_slots=4,
        is_pinned=lambda sha: False,
    ).load()
    row = bench_switch(pipeline, loras)
    assert ratio(row[3]) >= 100, row

    cold = bench_cold_load(world, tmp_path, lora=world.loras[1], label="tiny")
    assert ratio(cold[3]) > 1, cold  # the local disk beats a round trip to MinIO
