"""The LoRA tiers (MinIO origin, disk cache, CPU, resident adapters), their checks and the pipeline worker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from charlora_inference.loras import BaseModel, FetchedLoRA, LoRAFetcher, LoRARefused, parse_lora_file
from charlora_inference.metrics import Metrics
from charlora_inference.pipelines import BasePipeline, GenerationJob, PipelineWorker, QueueFull, adapter_name
from tests.inference.lorafiles import BASE_VERSION, World, build_lora_bytes, pickled_checkpoint

BASE = BaseModel("sd15", BASE_VERSION)


def fetcher(world: World, tmp_path: Path, *, metrics: Metrics | None = None) -> LoRAFetcher:
    return LoRAFetcher(base=BASE, cache_dir=tmp_path / "cache", s3=world.s3, metrics=metrics)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def job(lora: FetchedLoRA, *, seed: int = 7, n: int = 1, scale: float = 1.0) -> GenerationJob:
    return GenerationJob(
        lora=lora,
        prompt="a portrait",
        negative_prompt="",
        n=n,
        width=64,
        height=64,
        steps=2,
        cfg_scale=5.0,
        seed=seed,
        lora_scale=scale,
        freeu=None,
    )


def pixels(image: object) -> np.ndarray:
    return np.asarray(image)


def test_tiers_fetch_from_minio_then_disk_then_cpu(world: World, tmp_path: Path) -> None:
    entry = world.publish("team", "anna", version="v1", lora=world.loras[1])
    metrics = Metrics()
    tiers = fetcher(world, tmp_path, metrics=metrics)
    assert tiers.where(entry) == "remote"

    first = tiers.fetch(entry)
    assert first.tier == "remote"
    assert tiers.where(entry) == "cpu"
    assert tiers.fetch(entry).tier == "cpu"
    tiers.drop_cpu(entry.sha256)
    assert tiers.where(entry) == "disk"
    from_disk = tiers.fetch(entry)
    assert from_disk.tier == "disk"
    assert from_disk.state_dict.keys() == first.state_dict.keys()
    assert all(bool((from_disk.state_dict[k] == first.state_dict[k]).all()) for k in first.state_dict)

    assert value(metrics, "charlora_lora_loads_total", tier="remote") == 1
    assert value(metrics, "charlora_lora_loads_total", tier="disk") == 1
    assert value(metrics, "charlora_lora_cache_lookups_total", tier="cpu", result="hit") == 1
    assert value(metrics, "charlora_lora_cache_lookups_total", tier="cpu", result="miss") == 2

    # A corrupted disk-cache file is dropped and fetched from the origin again, not served.
    tiers.drop_cpu(entry.sha256)
    tiers.disk_path(entry.sha256).write_bytes(b"garbage")
    assert tiers.fetch(entry).tier == "remote"


def test_tampered_lora_is_refused(world: World, tmp_path: Path) -> None:
    # The manifest records LoRA 1, but the file in the bucket was replaced by LoRA 2.
    entry = world.publish("team", "anna", version="v1", lora=world.loras[2], manifest_bytes=world.loras[1])
    tiers = fetcher(world, tmp_path)
    with pytest.raises(LoRARefused, match="sha256"):
        tiers.fetch(entry)
    assert not tiers.disk_path(entry.sha256).exists()
    assert tiers.where(entry) == "remote"


def test_table_sha_must_match_the_manifest(world: World, tmp_path: Path) -> None:
    entry = world.publish("team", "anna", version="v1", lora=world.loras[1])
    wrong = entry.model_copy(update={"sha256": "0" * 64})
    with pytest.raises(LoRARefused, match="differs from the manifest"):
        fetcher(world, tmp_path).fetch(wrong)


def test_pickled_checkpoints_are_refused(world: World, tmp_path: Path) -> None:
    with pytest.raises(LoRARefused, match=r"only \.safetensors"):
        parse_lora_file("lora.ckpt", world.loras[1])
    # A pickle under the safetensors name, with a matching checksum: still never unpickled.
    entry = world.publish("team", "anna", version="v1", lora=pickled_checkpoint())
    with pytest.raises(LoRARefused, match="not a valid safetensors"):
        fetcher(world, tmp_path).fetch(entry)


def test_base_model_mismatch_is_refused(world: World, tmp_path: Path) -> None:
    entry = world.publish("team", "anna", version="v1", lora=world.loras[1], base_version="sd15-other")
    with pytest.raises(LoRARefused, match="base model"):
        fetcher(world, tmp_path).fetch(entry)
    # The table says the right base, but the manifest says otherwise: the manifest wins.
    lying = entry.model_copy(update={"base_model_version": BASE_VERSION})
    with pytest.raises(LoRARefused, match="manifest names base model"):
        fetcher(world, tmp_path).fetch(lying)


@pytest.fixture
def pipeline(tiny_base: Path) -> BasePipeline:
    return BasePipeline(
        path=tiny_base,
        base=BASE,
        device="cpu",
        dtype="float32",
        scheduler_name="euler",
        resident_slots=2,
        is_pinned=lambda sha: False,
        metrics=Metrics(),
    ).load()


def test_switching_resident_adapters_reloads_nothing_and_matches_diffusers(
    world: World, tmp_path: Path, pipeline: BasePipeline
) -> None:
    tiers = fetcher(world, tmp_path)
    anna = tiers.fetch(world.publish("team", "anna", version="v1", lora=world.loras[1]))
    bob = tiers.fetch(world.publish("team", "bob", version="v1", lora=world.loras[2]))
    assert pipeline.metrics is not None
    assert pipeline.adapters is not None

    anna_image = pixels(pipeline.generate(job(anna))[0])
    bob_image = pixels(pipeline.generate(job(bob))[0])
    loads = value(pipeline.metrics, "charlora_lora_loads_total", tier="gpu")
    assert loads == 2
    assert np.abs(anna_image.astype(int) - bob_image.astype(int)).max() > 10  # different characters, different images

    again = [pixels(pipeline.generate(job(lora))[0]) for lora in (anna, bob, anna)]
    assert value(pipeline.metrics, "charlora_lora_loads_total", tier="gpu") == loads  # switches moved no weights
    np.testing.assert_array_equal(again[0], anna_image)
    np.testing.assert_array_equal(again[1], bob_image)
    np.testing.assert_array_equal(again[2], anna_image)

    # The fast switch gives exactly what diffusers' own set_adapters gives, also at another scale.
    pipeline.pipe.set_adapters([adapter_name(bob.entry.sha256)], adapter_weights=[0.5])
    pipeline.adapters.active = None
    reference = pixels(pipeline.generate(job(bob, scale=0.5))[0])
    pipeline.generate(job(anna))
    np.testing.assert_array_equal(pixels(pipeline.generate(job(bob, scale=0.5))[0]), reference)


def test_eviction_is_lru_and_respects_pins(world: World, tmp_path: Path, tiny_base: Path) -> None:
    tiers = fetcher(world, tmp_path)
    loras = {
        seed: tiers.fetch(world.publish("team", f"c{seed}", version="v1", lora=world.loras[seed]))
        for seed in (1, 2, 3, 4)
    }
    pinned = {loras[1].entry.sha256}
    pipeline = BasePipeline(
        path=tiny_base,
        base=BASE,
        device="cpu",
        dtype="float32",
        scheduler_name=None,
        resident_slots=2,
        is_pinned=lambda sha: sha in pinned,
        metrics=Metrics(),
    ).load()
    adapters = pipeline.adapters
    assert adapters is not None
    for seed in (1, 2, 3):
        adapters.ensure(loras[seed])
    assert adapters.names() == [adapter_name(loras[s].entry.sha256) for s in (1, 2, 3)]
    adapters.ensure(loras[2])  # 2 becomes most recently used, so 3 is next out
    adapters.ensure(loras[4])
    assert set(adapters.names()) == {adapter_name(loras[s].entry.sha256) for s in (1, 2, 4)}
    assert set(pipeline.pipe.get_list_adapters()["unet"]) == set(adapters.names())  # evicted from the model too
    for seed in (3, 2, 4, 3):
        adapters.ensure(loras[seed])
    assert adapter_name(loras[1].entry.sha256) in adapters.names()  # the pinned one survived every eviction
    assert len(adapters.names()) == 3


def test_concurrent_requests_never_see_each_others_adapter(
    world: World, tmp_path: Path, pipeline: BasePipeline
) -> None:
    tiers = fetcher(world, tmp_path)
    loras = [tiers.fetch(world.publish("team", f"c{seed}", version="v1", lora=world.loras[seed])) for seed in (1, 2, 3)]
    expected = [pixels(pipeline.generate(job(lora))[0]) for lora in loras]

    worker = PipelineWorker(max_queue=64)
    results: dict[int, np.ndarray] = {}

    def client(index: int) -> None:
        lora = loras[index % 3]
        future = worker.submit(lambda: pipeline.generate(job(lora)))
        results[index] = pixels(future.result(timeout=120)[0])

    threads = [threading.Thread(target=client, args=(index,)) for index in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    worker.stop()
    assert len(results) == 9
    for index, image in results.items():
        np.testing.assert_array_equal(image, expected[index % 3])


def test_worker_queue_is_bounded() -> None:
    worker = PipelineWorker(max_queue=1)
    gate = threading.Event()
    running = worker.submit(gate.wait)  # occupies the worker
    while not running.running():
        pass
    worker.submit(lambda: None)  # waits
    with pytest.raises(QueueFull):
        worker.submit(lambda: None)
    worker.submit(lambda: None, request=False)  # internal tasks (preloads) are not bounded
    gate.set()
    worker.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batch_invariance_and_switching_on_cuda(world: World, tmp_path: Path, tiny_base: Path) -> None:
    # On a GPU, batched kernels differ most by batch shape: image 0 of n = 4 must still be bitwise image 0 of n = 1.
    tiers = fetcher(world, tmp_path)
    anna = tiers.fetch(world.publish("team", "anna", version="v1", lora=world.loras[1]))
    bob = tiers.fetch(world.publish("team", "bob", version="v1", lora=world.loras[2]))
    pipeline = BasePipeline(
        path=tiny_base,
        base=BASE,
        device="cuda",
        dtype="float16",
        scheduler_name="euler",
        resident_slots=2,
        is_pinned=lambda sha: False,
    ).load()
    single = pixels(pipeline.generate(job(anna))[0])
    batch = [pixels(image) for image in pipeline.generate(job(anna, n=4))]
    np.testing.assert_array_equal(batch[0], single)
    np.testing.assert_array_equal(batch[2], pixels(pipeline.generate(job(anna, seed=9))[0]))
    pipeline.generate(job(bob))
    np.testing.assert_array_equal(pixels(pipeline.generate(job(anna))[0]), single)


def test_cpu_and_disk_tiers_are_bounded_lru(world: World, tmp_path: Path) -> None:
    entries = [world.publish("team", f"c{seed}", version="v1", lora=world.loras[seed]) for seed in (1, 2, 3)]
    size = len(world.loras[1])
    assert all(len(world.loras[seed]) == size for seed in (2, 3))
    # Room for two files in each tier.
    tiers = LoRAFetcher(
        base=BASE, cache_dir=tmp_path / "cache", s3=world.s3, cpu_cache_bytes=2 * size, disk_cache_bytes=2 * size
    )
    tiers.fetch(entries[0])
    tiers.fetch(entries[1])
    tiers.fetch(entries[0])  # c1 is now more recently used than c2
    time.sleep(0.01)  # mtime orders the disk tier
    tiers.disk_path(entries[0].sha256).touch()
    tiers.fetch(entries[2])
    assert [tiers.where(entry) for entry in entries] == ["cpu", "remote", "cpu"]
    assert sorted(path.stem for path in (tmp_path / "cache").glob("*.safetensors")) == sorted(
        [entries[0].sha256, entries[2].sha256]
    )


def test_text_encoder_adapters_never_leak_into_unet_only_characters(
    world: World, tmp_path: Path, tiny_base: Path, pipeline: BasePipeline
) -> None:
    tiers = fetcher(world, tmp_path)
    with_encoder = build_lora_bytes(tiny_base, seed=7, text_encoder=True)
    assert any(key.startswith("text_encoder.") for key in load_safetensors(with_encoder))
    anna = tiers.fetch(world.publish("team", "anna", version="v1", lora=with_encoder))
    bob = tiers.fetch(world.publish("team", "bob", version="v1", lora=world.loras[2]))

    fresh = BasePipeline(
        path=tiny_base,
        base=BASE,
        device="cpu",
        dtype="float32",
        scheduler_name="euler",
        resident_slots=2,
        is_pinned=lambda sha: False,
    ).load()
    bob_alone = pixels(fresh.generate(job(bob))[0])
    anna_alone = pixels(fresh.generate(job(anna))[0])

    # On one pipeline: anna's text-encoder adapter is resident but must be inactive while bob is served.
    np.testing.assert_array_equal(pixels(pipeline.generate(job(anna))[0]), anna_alone)
    np.testing.assert_array_equal(pixels(pipeline.generate(job(bob))[0]), bob_alone)
    np.testing.assert_array_equal(pixels(pipeline.generate(job(anna))[0]), anna_alone)


def test_batch_invariance_holds_before_quantisation(world: World, tmp_path: Path, pipeline: BasePipeline) -> None:
    # Compared as float32 pixels, not PNGs: a batch-shape difference of ~1e-6 would vanish in 8-bit rounding.
    anna = fetcher(world, tmp_path).fetch(world.publish("team", "anna", version="v1", lora=world.loras[1]))
    single = pipeline.render(job(anna, seed=21), output_type="np")
    batch = pipeline.render(job(anna, seed=20, n=4), output_type="np")
    assert batch[1].dtype == np.float32
    np.testing.assert_array_equal(batch[1], single[0])
    assert np.abs(batch[0] - batch[1]).max() > 0.01  # the seeds do differ
