"""Several training processes in one pod, as accelerate runs them on several GPUs: here two CPU processes under
torchrun with gloo stand in for them (no GPU in CI). Each process takes its own batches, so an epoch has half the
steps, and only the main process writes the version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from charlora import artifacts
from tests.trainer.conftest import job_config, write_config

REPO = Path(__file__).resolve().parents[2]


def test_two_processes_split_the_epoch(tmp_path: Path, tiny_sd15: Path, local_dataset: Path) -> None:
    output = tmp_path / "out"
    config = job_config(
        family="sd15",
        model=tiny_sd15,
        dataset_uri=local_dataset.as_uri(),
        output_uri=output.as_uri() + "/",
        training={"epochs": 2, "batchSize": 2, "gridCfgScales": ["4"], "gradientCheckpointing": False},
        checkpointEverySteps=3,
    )
    path = write_config(tmp_path / "train.json", config)
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("torchrun")),
            "--nproc_per_node=2",
            "-m",
            "charlora_trainer",
            "--config",
            str(path),
            "--workdir",
            str(tmp_path / "work"),
        ],
        env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Training 10 steps (2 epochs of 5)") == 1  # 9 batches per epoch over 2 processes
    manifest = artifacts.Manifest.model_validate_json((output / artifacts.MANIFEST).read_text())
    assert (manifest.steps, manifest.epochs) == (10, [1, 2])
    lora = load_file(str(output / artifacts.LORA))
    assert all(torch.isfinite(t.float()).all() for t in lora.values())
    assert any(float(t.abs().max()) > 0 for k, t in lora.items() if "lora_up" in k)
    assert not list((output / "checkpoints").rglob("*.safetensors"))
