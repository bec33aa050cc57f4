"""The HTTP API over real HTTP (uvicorn on 127.0.0.1), with LoRAs in a real MinIO and the tiny SD1.5-like base."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from kubernetes import client as k8s
from safetensors.torch import save as safetensors_bytes

from charlora_inference.pipelines import FreeU
from tests.inference.http import Reply, RunningServer, decode_png, start_server
from tests.inference.lorafiles import BASE_VERSION, World
from tests.inference.test_tables import configmap as table_configmap

Start = Callable[..., RunningServer]


@pytest.fixture
def start(world: World, tmp_path: Path) -> Iterator[Start]:
    servers: list[RunningServer] = []

    def run(entries: list[Any], **options: Any) -> RunningServer:
        server = start_server(
            base=world.base,
            base_version=BASE_VERSION,
            workdir=tmp_path / f"server{len(servers)}",
            s3=world.s3,
            entries=entries,
            **options,
        )
        servers.append(server)
        return server

    yield run
    for server in servers:
        server.stop()


def request(character: str = "team/anna", **fields: Any) -> dict[str, Any]:
    return {"character": character, "prompt": "a portrait", "width": 64, "height": 64, "steps": 2, "seed": 11} | fields


def test_ready_only_after_pinned_loras_load(world: World, start: Start) -> None:
    # The pinned version is in the table before its files exist: the server must not report ready.
    pinned = world.publish("team", "anna", version="v1", lora=world.loras[1], pinned=True)
    missing = pinned.model_copy(update={"artifact_uri": pinned.artifact_uri.replace("/v1/", "/v9/")})
    running = start([missing])
    assert running.get("/healthz").status == 200
    time.sleep(0.5)
    reply = running.get("/readyz")
    assert reply.status == 503
    assert "team/anna" in reply.body.decode()
    assert running.post(request()).status == 503

    running.set_table([pinned])
    running.wait_ready(timeout=10)
    characters = running.get("/v1/characters", key="team-key").json()
    assert characters["characters"] == [
        {
            "character": "team/anna",
            "version": "v1",
            "epoch": None,
            "sha256": pinned.sha256,
            "pinned": True,
            "tier": "gpu",
            "refused": None,
        }
    ]
    assert characters["scheduler"] == "EulerDiscreteScheduler"
    assert characters["baseModel"]["version"] == BASE_VERSION


def test_characters_seeds_batch_invariance_and_provenance(world: World, start: Start) -> None:
    anna = world.publish("team", "anna", version="v1", lora=world.loras[1], pinned=True)
    bob = world.publish("team", "bob", version="v1", lora=world.loras[2])
    running = start([anna, bob])
    running.wait_ready()

    first = running.post(request())
    assert first.status == 200, first.body
    assert first.json()["version"] == "v1"
    assert first.json()["scheduler"] == "EulerDiscreteScheduler"
    anna_image = first.images()[0]
    bob_image = running.post(request("team/bob")).images()[0]
    assert np.abs(anna_image.astype(int) - bob_image.astype(int)).max() > 10
    np.testing.assert_array_equal(running.post(request()).images()[0], anna_image)  # same character + seed
    assert np.abs(running.post(request(seed=12)).images()[0].astype(int) - anna_image.astype(int)).max() > 0

    # n = 4: image i is exactly what n = 1 with seed + i gives.
    batch = running.post(request(n=4))
    assert [item["seed"] for item in batch.json()["data"]] == [11, 12, 13, 14]
    images = batch.images()
    np.testing.assert_array_equal(images[0], anna_image)
    np.testing.assert_array_equal(images[3], running.post(request(seed=14)).images()[0])

    text = batch.png_text(2)
    assert text["character"] == "team/anna"
    assert text["lora_version"] == "v1"
    assert text["lora_sha256"] == anna.sha256
    assert text["seed"] == "13"
    assert text["steps"] == "2"
    assert text["cfg_scale"] == "7.0"
    assert text["scheduler"] == "EulerDiscreteScheduler"
    assert text["base_model_version"] == BASE_VERSION
    assert text["base_model"] == str(world.base)

    png = running.post(request(response_format="png", cfg_scale=5.0))
    assert png.status == 200
    assert png.headers["content-type"] == "image/png"
    assert png.headers["x-charlora-seed"] == "11"
    assert png.png_text()["cfg_scale"] == "5.0"
    assert decode_png(png.body).shape == (64, 64, 3)


def test_freeu_per_request_and_server_default(world: World, start: Start) -> None:
    anna = world.publish("team", "anna", version="v1", lora=world.loras[1])
    running = start([anna], freeu_default=FreeU(0.9, 0.2, 1.5, 1.6))
    running.wait_ready()
    default = running.post(request())
    off = running.post(request(freeu=False))
    family = running.post(request(freeu=True))
    custom = running.post(request(freeu={"s1": 0.5, "s2": 0.5, "b1": 1.2, "b2": 1.2}))
    assert default.png_text()["freeu"] == family.png_text()["freeu"] != "off"
    assert off.png_text()["freeu"] == "off"
    np.testing.assert_array_equal(default.images()[0], family.images()[0])  # the default is the family's values
    assert np.abs(default.images()[0].astype(int) - off.images()[0].astype(int)).max() > 0
    assert np.abs(custom.images()[0].astype(int) - off.images()[0].astype(int)).max() > 0


def test_errors_name_the_reason_and_are_never_500(world: World, start: Start) -> None:
    anna = world.publish("team", "anna", version="v1", lora=world.loras[1])
    zed = world.publish("other", "zed", version="v1", lora=world.loras[2])
    # The manifest records LoRA 4 (never fetched: the caches are content-addressed, so a cached copy of the genuine
    # bytes would rightly be served), but the bucket holds LoRA 3.
    tampered = world.publish("team", "tampered", version="v1", lora=world.loras[3], manifest_bytes=world.loras[4])
    junk = world.publish(
        "team", "junk", version="v1", lora=safetensors_bytes({"unet.nothing.lora.down.weight": torch.ones(2, 2)})
    )
    running = start([anna, zed, tampered, junk])
    running.wait_ready()

    assert running.post(request(), key=None).status == 401
    assert running.post(request(), key="wrong-key").status == 401
    assert running.get("/v1/characters").status == 401
    forbidden = running.post(request("other/zed"))
    assert forbidden.status == 403
    assert "other" in forbidden.json()["detail"]
    assert running.post(request("other/zed"), key="other-key").status == 200
    assert running.post(request("anna")).status == 200  # a single-namespace key may leave the namespace out
    assert running.post(request("anna"), key="admin-key").status == 422
    assert running.post(request("team/nobody")).status == 404
    missing_version = running.post(request(version="v7"))
    assert missing_version.status == 404
    assert "v7" in missing_version.json()["detail"]

    for field, value in [("n", 0), ("width", 65), ("steps", 0), ("cfg_scale", "high"), ("version", "7")]:
        reply = running.post(request(**{field: value}))
        assert reply.status == 422, (field, reply.body)
        assert reply.json()["detail"][0]["loc"] == ["body", field]
    assert running.post(request(n=2, response_format="png")).json()["detail"][0]["loc"] == ["body", "n"]
    assert running.post(request(n=9)).json()["detail"][0]["loc"] == ["body", "n"]
    assert running.post(request(sampler="euler")).json()["detail"][0]["loc"] == ["body", "sampler"]
    no_prompt = request()
    del no_prompt["prompt"]
    assert running.post(no_prompt).json()["detail"][0]["loc"] == ["body", "prompt"]

    refused = running.post(request("team/tampered"))
    assert refused.status == 409
    assert "sha256" in refused.json()["detail"]
    # Valid safetensors, but no LoRA for this base: refused when it is injected, still no 500.
    not_a_lora = running.post(request("team/junk"))
    assert not_a_lora.status == 409
    assert "does not fit the base model" in not_a_lora.json()["detail"]
    assert running.post(request()).status == 200  # and the pipeline still serves
    visible = {row["character"] for row in running.get("/v1/characters", key="team-key").json()["characters"]}
    assert visible == {"team/anna", "team/tampered", "team/junk"}


def test_full_queue_answers_429(world: World, start: Start) -> None:
    anna = world.publish("team", "anna", version="v1", lora=world.loras[1])
    running = start([anna], max_queue=1)
    running.wait_ready()
    # Hold the real worker busy with an internal task, so the queue fills deterministically.
    gate = threading.Event()
    worker = running.server.worker
    assert worker is not None
    worker.submit(gate.wait, request=False)
    queued: list[Reply] = []
    thread = threading.Thread(target=lambda: queued.append(running.post(request())))
    thread.start()
    deadline = time.monotonic() + 10
    while running.metric("charlora_queue_depth") < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    rejected = running.post(request())
    assert rejected.status == 429
    assert rejected.headers["retry-after"] == "1"
    assert "queue" in rejected.json()["detail"]
    gate.set()
    thread.join()
    assert queued[0].status == 200
    assert running.post(request()).status == 200  # room again
    assert running.metric("charlora_requests_rejected_total", status="429") == 1


def test_rollback_applies_to_the_next_request_and_spares_in_flight_ones(world: World, start: Start) -> None:
    v1 = world.publish("team", "anna", version="v1", lora=world.loras[1])
    v2 = world.publish("team", "anna", version="v2", lora=world.loras[2])
    running = start([v1])
    running.wait_ready()
    v1_image = running.post(request()).images()[0]

    running.set_table([v2])  # promotion
    promoted = running.post(request())
    assert promoted.json()["version"] == "v2"
    v2_image = promoted.images()[0]
    assert np.abs(v2_image.astype(int) - v1_image.astype(int)).max() > 10

    running.set_table([v1])  # rollback
    rolled_back = running.post(request())
    assert rolled_back.json()["version"] == "v1"
    np.testing.assert_array_equal(rolled_back.images()[0], v1_image)

    # An explicit older version is served from its manifest while the table points elsewhere.
    explicit = running.post(request(version="v2"))
    assert explicit.json()["version"] == "v2"
    np.testing.assert_array_equal(explicit.images()[0], v2_image)

    # In flight: a request admitted on v2 (queued behind an internal task that holds the real worker) finishes on
    # v2 although the table rolls back before it runs.
    running.set_table([v2])
    gate = threading.Event()
    worker = running.server.worker
    assert worker is not None
    worker.submit(gate.wait, request=False)
    result: list[Reply] = []
    thread = threading.Thread(target=lambda: result.append(running.post(request())))
    thread.start()
    deadline = time.monotonic() + 10
    while running.metric("charlora_queue_depth") < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    running.set_table([v1])
    gate.set()
    thread.join()
    assert result[0].json()["version"] == "v2"
    np.testing.assert_array_equal(result[0].images()[0], v2_image)
    after = running.post(request())
    assert after.json()["version"] == "v1"
    np.testing.assert_array_equal(after.images()[0], v1_image)


def test_metrics_move(world: World, start: Start) -> None:
    anna = world.publish("team", "anna", version="v1", lora=world.loras[1], pinned=True)
    bob = world.publish("team", "bob", version="v1", lora=world.loras[2])
    running = start([anna, bob])
    running.wait_ready()
    assert running.metric("charlora_lora_loads_total", tier="remote") == 1  # the pinned preload
    for character in ("team/anna", "team/bob", "team/anna", "team/bob"):
        assert running.post(request(character, n=2)).status == 200
    running.post(request("team/nobody"))

    text = running.get("/metrics").body.decode()
    assert "charlora_images_generated_total 8.0" in text
    assert running.metric("charlora_request_seconds_count", status="200") == 4
    assert running.metric("charlora_lora_loads_total", tier="remote") == 2
    assert running.metric("charlora_lora_loads_total", tier="gpu") == 2  # each injected once, then switched
    assert running.metric("charlora_adapter_switch_seconds_count") >= 4
    assert running.metric("charlora_lora_cache_lookups_total", tier="cpu", result="hit") >= 2
    assert running.metric("charlora_requests_rejected_total", status="404") == 1
    assert running.metric("charlora_request_seconds_count", status="404") == 1
    assert running.metric("charlora_queue_depth") == 0
    assert running.metric("charlora_requests_in_progress") == 0


def test_epoch_checkpoint_with_kohya_keys_is_served(world: World, kohya_lora: bytes, start: Start) -> None:
    # The trainer writes epoch checkpoints with kohya keys; LoRA 1 under kohya keys must draw what LoRA 1 draws.
    epoch = world.publish("team", "anna", version="v1", lora=world.loras[1], epochs={2: kohya_lora}, serve_epoch=2)
    final = epoch.model_copy(update={"epoch": None, "sha256": hashlib.sha256(world.loras[1]).hexdigest()})
    running = start([final])
    running.wait_ready()
    final_image = running.post(request()).images()[0]
    running.set_table([epoch])
    reply = running.post(request())
    assert reply.json()["epoch"] == 2
    assert reply.png_text()["lora_epoch"] == "2"
    np.testing.assert_array_equal(reply.images()[0], final_image)


def test_rollback_through_the_kubernetes_table(world: World, start: Start, kube: k8s.ApiClient, namespace: str) -> None:
    v1 = world.publish(namespace, "anna", version="v1", lora=world.loras[1], pinned=True)
    v2 = world.publish(namespace, "anna", version="v2", lora=world.loras[2], pinned=True)
    core = k8s.CoreV1Api(kube)
    core.create_namespaced_config_map(namespace, table_configmap(namespace, v2))
    running = start([], kube=kube)
    running.wait_ready()
    body = request(f"{namespace}/anna")
    promoted = running.post(body, key="admin-key")
    assert promoted.json()["version"] == "v2"

    started = time.monotonic()
    core.replace_namespaced_config_map(
        table_configmap(namespace, v1).metadata.name, namespace, table_configmap(namespace, v1)
    )
    while running.server.table.get(v1.key) != v1:
        assert time.monotonic() - started < 1.0, "the rollback did not arrive within a second"
        time.sleep(0.01)
    rolled_back = running.post(body, key="admin-key")
    assert rolled_back.json()["version"] == "v1"
    np.testing.assert_array_equal(
        rolled_back.images()[0], running.post(body | {"version": "v1"}, key="admin-key").images()[0]
    )
    assert np.abs(rolled_back.images()[0].astype(int) - promoted.images()[0].astype(int)).max() > 10


def test_characters_report_tiers_and_pins_survive_eviction(world: World, start: Start) -> None:
    anna = world.publish("team", "anna", version="v1", lora=world.loras[1], pinned=True)
    bob = world.publish("team", "bob", version="v1", lora=world.loras[2])
    carol = world.publish("team", "carol", version="v1", lora=world.loras[3])
    dave = world.publish("team", "dave", version="v1", lora=world.loras[4])
    running = start([anna, bob, carol, dave], resident_slots=1)
    running.wait_ready()

    def tiers() -> dict[str, str]:
        rows = running.get("/v1/characters", key="team-key").json()["characters"]
        return {row["character"].split("/")[1]: row["tier"] for row in rows}

    assert tiers() == {"anna": "gpu", "bob": "remote", "carol": "remote", "dave": "remote"}
    assert running.post(request("team/bob")).status == 200
    assert running.post(request("team/carol")).status == 200  # one unpinned slot: bob makes room for carol
    assert tiers() == {"anna": "gpu", "bob": "cpu", "carol": "gpu", "dave": "remote"}
    assert running.metric("charlora_adapter_evictions_total") == 1
    assert running.post(request("team/anna")).status == 200
    assert running.post(request("team/bob")).status == 200
    assert tiers() == {"anna": "gpu", "bob": "gpu", "carol": "cpu", "dave": "remote"}
