"""Preemption: a real trainer process killed mid-run resumes from its last saved step and ends with the same LoRA
as a run that was never interrupted; the resume state is gone after success."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load

from charlora import artifacts
from charlora.storing import NotFound, S3Settings, open_store
from tests.trainer.conftest import job_config, write_config

REPO = Path(__file__).resolve().parents[2]
TOTAL_STEPS = 30


def start(config_path: Path, workdir: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "charlora_trainer", "--config", str(config_path), "--workdir", str(workdir)],
        env={**os.environ, **env},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_run_resumes_and_matches_an_uninterrupted_one(
    tmp_path: Path, tiny_sd15: Path, local_dataset: Path, s3_env: dict[str, str], s3_settings: S3Settings, bucket: str
) -> None:
    def config_for(version: str) -> tuple[Path, str]:
        output = f"s3://{bucket}/versions/team-a/anna/{version}/"
        config = job_config(
            family="sd15",
            model=tiny_sd15,
            dataset_uri=local_dataset.as_uri(),
            output_uri=output,
            training={
                "maxSteps": TOTAL_STEPS,
                "batchSize": 2,
                "unetLearningRate": "1e-3",
                "gridCfgScales": ["4"],
                "gradientCheckpointing": False,
            },
            checkpointEverySteps=5,
            version=version,
        )
        return write_config(tmp_path / f"{version}.json", config), output

    config_path, output = config_for("v1")
    store = open_store(output, s3_settings)
    latest = output + artifacts.CHECKPOINTS_DIR + "latest.json"

    first = start(config_path, tmp_path / "pod-1", s3_env)
    deadline = time.monotonic() + 240
    saved: dict[str, object] = {}
    while time.monotonic() < deadline and first.poll() is None:
        try:
            saved = json.loads(store.read_bytes(latest))
        except NotFound:
            time.sleep(0.05)
            continue
        break
    first.send_signal(signal.SIGKILL)  # preemption: no chance to clean up
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    saved_step = int(str(saved["step"]))
    assert 5 <= saved_step < TOTAL_STEPS
    assert saved_step % 5 == 0
    assert not store.exists(output + artifacts.MANIFEST)

    second = start(config_path, tmp_path / "pod-2", s3_env)  # a fresh pod: empty work directory
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    resumed = [line for line in stderr.splitlines() if line.startswith("Resumed from step")]
    assert resumed, stderr
    resumed_step = int(resumed[0].split()[3])
    assert resumed_step >= saved_step  # the first pod may have saved again between the read and the kill
    assert resumed_step % 5 == 0

    manifest = artifacts.Manifest.model_validate_json(store.read_bytes(output + artifacts.MANIFEST))
    assert manifest.steps == TOTAL_STEPS
    assert not list(store.list(output + artifacts.CHECKPOINTS_DIR))

    # The same run without interruption ends with the same LoRA, to float precision.
    clean_config, clean_output = config_for("v2")
    clean = start(clean_config, tmp_path / "pod-clean", s3_env)
    _, clean_err = clean.communicate(timeout=300)
    assert clean.returncode == 0, clean_err
    interrupted = load(store.read_bytes(output + artifacts.LORA))
    uninterrupted = load(store.read_bytes(clean_output + artifacts.LORA))
    assert interrupted.keys() == uninterrupted.keys()
    torch.testing.assert_close(interrupted, uninterrupted, atol=1e-3, rtol=1e-3)
    assert any(float(t.abs().max()) > 1e-3 for k, t in interrupted.items() if "lora_up" in k)  # it did train
