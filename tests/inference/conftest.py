"""Fixtures of the inference tests: one tiny SD1.5-like base per session, four LoRAs for it, and a ``World`` that
publishes versions into a fresh bucket of the real MinIO.

Without the inference extras (torch, diffusers, peft, fastapi, uvicorn) only the tests that need none of them are
collected, so an environment installed for the operator alone still runs the rest of the suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from charlora.devtools.minio import MinioServer
from charlora.storing import S3Settings

if TYPE_CHECKING:
    from tests.inference.lorafiles import World

INFERENCE_EXTRAS = ("torch", "diffusers", "peft", "transformers", "fastapi", "uvicorn", "PIL", "numpy")
if not all(find_spec(module) for module in INFERENCE_EXTRAS):
    collect_ignore = [
        "test_loras.py",
        "test_http.py",
        "test_entrypoint.py",
        "test_trainer_output.py",
        "test_bench.py",
        "http.py",
        "lorafiles.py",
    ]


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny models are too small to gain from intra-op threads, and on a shared 2-core machine OpenMP workers
    spinning against other processes made each image about 10x slower (measured: 0.9 s vs 0.07 s for 2 steps)."""
    if find_spec("torch") is None:
        yield
        return
    import torch  # noqa: PLC0415 - absent without the inference extras

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from charlora.devtools.tiny_models import build_tiny_pipeline  # noqa: PLC0415

    return build_tiny_pipeline("sd15", tmp_path_factory.mktemp("base") / "sd15", seed=0)


@pytest.fixture(scope="session")
def lora_bytes(tiny_base: Path) -> dict[int, bytes]:
    """Four distinct LoRAs for the tiny base, by seed."""
    from tests.inference.lorafiles import build_lora_bytes  # noqa: PLC0415

    return {seed: build_lora_bytes(tiny_base, seed=seed) for seed in (1, 2, 3, 4)}


@pytest.fixture(scope="session")
def kohya_lora(tiny_base: Path) -> bytes:
    """LoRA 1's weights under kohya keys."""
    from tests.inference.lorafiles import build_lora_bytes  # noqa: PLC0415

    return build_lora_bytes(tiny_base, seed=1, kohya=True)


@pytest.fixture
def world(tiny_base: Path, lora_bytes: dict[int, bytes], minio: MinioServer, bucket: str) -> World:
    from tests.inference.lorafiles import World  # noqa: PLC0415

    settings = S3Settings(endpoint=minio.endpoint, access_key=minio.access_key, secret_key=minio.secret_key)
    return World(tiny_base, lora_bytes, f"s3://{bucket}/loras", settings)
