"""``python -m charlora_inference`` as a real process: a tiny SDXL-like base, a pinned LoRA in MinIO, a table file."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from charlora.devtools.minio import MinioServer
from charlora.devtools.tiny_models import build_tiny_pipeline
from charlora_inference.__main__ import parse_args
from tests.inference.http import call, write_table
from tests.inference.lorafiles import World, build_lora_bytes


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline("sdxl", tmp_path_factory.mktemp("sdxl") / "sdxl", seed=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_entry_point_serves_an_sdxl_base(world: World, minio: MinioServer, tiny_sdxl: Path, tmp_path: Path) -> None:
    lora = build_lora_bytes(tiny_sdxl, seed=5)
    entry = world.publish("team", "anna", version="v1", lora=lora, pinned=True, family="sdxl", base_version="tiny-sdxl")
    table = tmp_path / "table.yaml"
    write_table(table, [entry])
    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump({"keys": [{"name": "t", "sha256": hashlib.sha256(b"k").hexdigest(), "namespaces": ["team"]}]})
    )
    port = free_port()
    env = {
        **os.environ,
        "CHARLORA_S3_ENDPOINT": minio.endpoint,
        "AWS_ACCESS_KEY_ID": minio.access_key,
        "AWS_SECRET_ACCESS_KEY": minio.secret_key,
    }
    command = [sys.executable, "-m", "charlora_inference", "--base", str(tiny_sdxl), "--base-version", "tiny-sdxl"]
    command += ["--table", str(table), "--api-keys", str(keys), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--torch-threads", "1"]
    command += ["--scheduler", "dpmpp_2m"]
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if call(f"{url}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the server did not become ready: " + (tmp_path / "server.log").read_text()[-3000:])

        listing = call(f"{url}/v1/characters", key="k").json()
        assert listing["baseModel"] == {"family": "sdxl", "version": "tiny-sdxl", "uri": str(tiny_sdxl)}
        assert listing["scheduler"] == "DPMSolverMultistepScheduler"
        assert listing["dtype"] == "float32"
        assert [row["tier"] for row in listing["characters"]] == ["gpu"]
        body = {"character": "anna", "prompt": "a portrait", "width": 64, "height": 64, "steps": 2, "seed": 3}
        reply = call(f"{url}/v1/images/generations", body=body, key="k")
        assert reply.status == 200, reply.body
        assert reply.png_text()["base_model_family"] == "sdxl"
        assert reply.png_text()["scheduler"] == "DPMSolverMultistepScheduler"
        assert call(f"{url}/openapi.json").json()["paths"].keys() >= {"/v1/images/generations", "/v1/characters"}
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        log.close()


def test_local_defaults_and_refusals(tmp_path: Path) -> None:
    base = tmp_path / "sd15-tiny-v3"
    args = parse_args(["--base", str(base), "--table", "t.yaml"])  # what `charlora serve --base --table` gives
    assert args.base_version == "sd15-tiny-v3"
    assert args.host == "127.0.0.1"
    assert args.api_keys is None
    with pytest.raises(SystemExit):
        parse_args(["--base", str(base), "--table", "t.yaml", "--host", "0.0.0.0"])  # open to the network, no keys
    with pytest.raises(SystemExit):
        parse_args(["--base", str(base)])  # no table source
