"""Benchmark of the inference server's LoRA handling, on the tiny SD1.5-like pipeline and a real MinIO.

Run from the repository root: ``python -m bench.inference [--requests 40]``. Prints one ratio table:

(a) switching between two resident adapters vs the naive path (diffusers ``load_lora_weights`` +
    ``unload_lora_weights`` per request, from a state dict already in memory) — target >= 100x;
(b) a 10-character round-robin request stream vs a single-character stream through the pipeline worker — target
    >= 0.9x throughput;
(c) a cold LoRA load from the local disk cache vs from MinIO (tiny LoRA and a 64 MiB one);
(d) with CUDA only: an SDXL-architecture UNet with random weights, 1024 px (128x128 latents, CFG batch 2), 30 steps,
    with and without a rank-32 LoRA active — target overhead <= 5%;
(e) with ``--characters N``: the serving table from N per-character ConfigMaps on a real kube-apiserver — time to
    list them all, and how long one promotion takes to reach the watching table.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import torch
from tests.inference.lorafiles import World, build_lora_bytes

from charlora.api.serving import ServingEntry
from charlora.devtools.minio import MinioServer
from charlora.devtools.tiny_models import build_tiny_pipeline
from charlora.devtools.tools import Toolbox
from charlora.storing import S3Settings
from charlora_inference.loras import BaseModel, FetchedLoRA, LoRAFetcher
from charlora_inference.pipelines import BasePipeline, GenerationJob, PipelineWorker

BASE = BaseModel("sd15", "bench-tiny-sd15")
Row = tuple[str, str, str, str]


def _median_seconds(run: Callable[[], object], *, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def bench_switch(pipeline: BasePipeline, loras: list[FetchedLoRA]) -> Row:
    adapters = pipeline.adapters
    assert adapters is not None
    names = [adapters.ensure(lora) for lora in loras[:2]]
    turn = iter(range(10**9))
    switch = _median_seconds(lambda: adapters.activate(names[next(turn) % 2], 1.0), repeat=400)

    pipe = pipeline.pipe

    def naive() -> None:
        pipe.load_lora_weights(dict(loras[2].state_dict), adapter_name="naive")
        pipe.set_adapters(["naive"], adapter_weights=[1.0])
        pipe.delete_adapters("naive")  # unload_lora_weights would drop the resident adapters as well

    naive_seconds = _median_seconds(naive, repeat=20)
    adapters.active = None
    return (
        "(a) adapter switch, resident vs naive load+unload",
        f"{switch * 1e3:.3f} ms",
        f"{naive_seconds * 1e3:.1f} ms",
        f"{naive_seconds / switch:.0f}x faster (target >= 100x)",
    )


def bench_round_robin(pipeline: BasePipeline, loras: list[FetchedLoRA], *, requests: int) -> Row:
    worker = PipelineWorker(max_queue=requests + 1)

    def job(lora: FetchedLoRA, index: int) -> GenerationJob:
        return GenerationJob(
            lora=lora,
            prompt="a portrait",
            negative_prompt="",
            n=1,
            width=64,
            height=64,
            steps=4,
            cfg_scale=5.0,
            seed=index,
            lora_scale=1.0,
            freeu=None,
        )

    def generate(lora: FetchedLoRA, index: int) -> object:
        return pipeline.generate(job(lora, index))

    def stream(pick: Callable[[int], FetchedLoRA]) -> float:
        started = time.perf_counter()
        futures = [worker.submit(functools.partial(generate, pick(i), i)) for i in range(requests)]
        for future in futures:
            future.result()
        return requests / (time.perf_counter() - started)

    for lora in loras[:10]:  # all ten resident first: this measures switching, not cold loads
        worker.submit(functools.partial(generate, lora, 0), request=False).result()
    single, round_robin = [], []
    for _ in range(3):  # interleaved, so load on a shared machine hits both alike
        single.append(stream(lambda i: loras[0]))
        round_robin.append(stream(lambda i: loras[i % 10]))
    worker.stop()
    best_single, best_rr = max(single), max(round_robin)
    return (
        "(b) throughput, 10-character round robin vs 1",
        f"{best_rr:.1f} img/s",
        f"{best_single:.1f} img/s",
        f"{best_rr / best_single:.2f}x (target >= 0.9x)",
    )


def bench_cold_load(world: World, workdir: Path, *, lora: bytes, label: str) -> Row:
    entry = world.publish("bench", f"cold-{label}", version="v1", lora=lora, base_version=BASE.version)
    remote, disk = [], []
    for attempt in range(5):
        fetcher = LoRAFetcher(base=BASE, cache_dir=workdir / f"cache-{label}-{attempt}", s3=world.s3)
        remote.append(fetcher.fetch(entry).seconds)
        fetcher.drop_cpu(entry.sha256)
        disk.append(fetcher.fetch(entry).seconds)
    r, d = statistics.median(remote), statistics.median(disk)
    return (f"(c) cold load {label}, disk cache vs MinIO", f"{d * 1e3:.1f} ms", f"{r * 1e3:.1f} ms", f"{r / d:.1f}x")


def big_lora(size_mib: int) -> bytes:
    """A LoRA-shaped safetensors file of about ``size_mib`` MiB (the size of a rank-32..64 SDXL LoRA)."""
    from safetensors.torch import save  # noqa: PLC0415

    tensors = {}
    per_tensor = 320 * 64  # float32 elements of one (64 x 320) down matrix
    for index in range(size_mib * (1 << 20) // (4 * per_tensor)):
        tensors[f"unet.block_{index}.lora.down.weight"] = torch.randn(64, 320)
    return save(tensors)


def bench_gpu_overhead() -> Row:
    from diffusers import UNet2DConditionModel  # noqa: PLC0415
    from peft import LoraConfig  # noqa: PLC0415

    # The SDXL base UNet's architecture (random weights: nothing can be downloaded).
    model: Any = UNet2DConditionModel(  # type: ignore[no-untyped-call]
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    unet = model.to("cuda", torch.float16)
    latents = torch.randn(2, 4, 128, 128, device="cuda", dtype=torch.float16)
    text = torch.randn(2, 77, 2048, device="cuda", dtype=torch.float16)
    added = {
        "text_embeds": torch.randn(2, 1280, device="cuda", dtype=torch.float16),
        "time_ids": torch.randn(2, 6, device="cuda", dtype=torch.float16),
    }

    def thirty_steps() -> None:
        with torch.inference_mode():
            for step in range(30):
                unet(latents, 999 - step * 33, encoder_hidden_states=text, added_cond_kwargs=added)
        torch.cuda.synchronize()

    thirty_steps()
    plain = _median_seconds(thirty_steps, repeat=5)
    unet.add_adapter(
        LoraConfig(r=32, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="c"
    )
    unet.to("cuda", torch.float16)
    thirty_steps()
    with_lora = _median_seconds(thirty_steps, repeat=5)
    return (
        "(d) SDXL UNet 1024px x 30 steps, LoRA vs none",
        f"{with_lora:.2f} s",
        f"{plain:.2f} s",
        f"{(with_lora / plain - 1) * 100:+.1f}% (target <= 5%)",
    )


def bench_table_scale(characters: int) -> Row:
    from kubernetes import client as k8s  # noqa: PLC0415
    from tests.world import api_client_for  # noqa: PLC0415

    from charlora.api.serving import build_table_configmap  # noqa: PLC0415
    from charlora.devtools.controlplane import ControlPlane  # noqa: PLC0415
    from charlora_inference.tables import KubernetesTableSource, ServingTable  # noqa: PLC0415

    plane = ControlPlane(Toolbox()).start()
    try:
        with api_client_for(plane) as api:
            core = k8s.CoreV1Api(api)
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name="chars")))

            def entry(index: int, version: str = "v1") -> ServingEntry:
                return ServingEntry(
                    namespace="chars",
                    character=f"c{index:05d}",
                    version=version,
                    artifact_uri=f"s3://b/chars/c{index:05d}/{version}/",
                    sha256=hashlib.sha256(f"{index}{version}".encode()).hexdigest(),
                    base_model_family="sd15",
                    base_model_version="x",
                )

            def body(item: ServingEntry) -> Any:
                return build_table_configmap(item, server="s", server_namespace="n")

            def create(index: int) -> None:
                core.create_namespaced_config_map("chars", body(entry(index)))

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(create, range(characters)))
            table = ServingTable()
            started = time.perf_counter()
            source = KubernetesTableSource(api, table, server="s", server_namespace="n").start()
            table.synced.wait(300)
            listed = time.perf_counter() - started
            assert len(table.entries()) == characters
            changes = []
            for index in range(0, characters, max(1, characters // 10)):  # ten promotions, one at a time
                promoted = entry(index, "v2")
                started = time.perf_counter()
                core.replace_namespaced_config_map(body(promoted)["metadata"]["name"], "chars", body(promoted))
                while table.get(promoted.key) != promoted:
                    time.sleep(0.001)
                changes.append(time.perf_counter() - started)
            source.stop()
    finally:
        plane.stop()
    return (
        f"(e) table of {characters} ConfigMaps: promotion seen vs full list",
        f"{statistics.median(changes) * 1e3:.0f} ms",
        f"{listed:.2f} s",
        "one row per object; target: a change within ~1 s",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="requests per stream in (b)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny models)")
    parser.add_argument("--characters", type=int, default=0, help="also measure (e) with this many table ConfigMaps")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        toolbox = Toolbox()
        minio = MinioServer(toolbox).start()
        try:
            s3 = S3Settings(endpoint=minio.endpoint, access_key=minio.access_key, secret_key=minio.secret_key)
            bucket = f"bench-{secrets.token_hex(4)}"
            client: Any = boto3.client(
                "s3",
                endpoint_url=minio.endpoint,
                aws_access_key_id=minio.access_key,
                aws_secret_access_key=minio.secret_key,
                region_name="us-east-1",
            )
            client.create_bucket(Bucket=bucket)
            base = build_tiny_pipeline("sd15", workdir / "base", seed=0)
            files = {seed: build_lora_bytes(base, seed=seed) for seed in range(1, 12)}
            world = World(base, files, f"s3://{bucket}/loras", s3)
            fetcher = LoRAFetcher(base=BASE, cache_dir=workdir / "cache", s3=s3)
            loras = [
                fetcher.fetch(world.publish("bench", f"c{seed}", version="v1", lora=data, base_version=BASE.version))
                for seed, data in files.items()
            ]
            pipeline = BasePipeline(
                path=base,
                base=BASE,
                device="cpu",
                dtype="float32",
                scheduler_name="euler",
                resident_slots=16,
                is_pinned=lambda sha: False,
            ).load()
            rows.append(bench_switch(pipeline, loras))
            rows.append(bench_round_robin(pipeline, loras, requests=args.requests))
            tiny_kib = len(files[1]) // 1024
            rows.append(bench_cold_load(world, workdir, lora=files[1], label=f"{tiny_kib} KiB"))
            rows.append(bench_cold_load(world, workdir, lora=big_lora(64), label="64 MiB"))
        finally:
            minio.stop()
    if torch.cuda.is_available():
        rows.append(bench_gpu_overhead())
    else:
        rows.append(("(d) SDXL UNet 1024px x 30 steps, LoRA vs none", "-", "-", "not measured: no CUDA device"))
    if args.characters:
        rows.append(bench_table_scale(args.characters))
    header: Row = ("measurement", "ours", "baseline", "ratio")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), {args.requests} requests per stream")


if __name__ == "__main__":
    main()
