"""charlora inspect: real LoRA files (peft on the tiny UNet, exported by the trainer's kohya code) are described
from their safetensors header; pickles and truncated files are refused without unpickling anything."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file

from charlora.devtools.tiny_models import build_tiny_pipeline
from charlora.inspecting import NotSafetensors, inspect_lora, render
from charlora_trainer.kohya import kohya_header, to_kohya


@pytest.fixture(scope="module")
def lora_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """A real peft LoRA (rank 4, alpha 2) on the tiny SD1.5-like UNet."""
    base = build_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny") / "sd15")
    unet: Any = UNet2DConditionModel.from_pretrained(base / "unet")  # type: ignore[no-untyped-call]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return {k: v.contiguous() for k, v in get_peft_model_state_dict(unet).items()}


def test_kohya_file_is_described(lora_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    header = kohya_header(
        family="sdxl",
        rank=4,
        alpha=2,
        resolution=1024,
        title="anna v1",
        facts={"seed": 42, "sd_model_hash": "abc123"},
        created=datetime.datetime(2026, 11, 1),
    )
    save_file(to_kohya({"lora_unet": lora_state}, alpha=2.0), str(path), metadata=header)
    report = inspect_lora(path)
    assert (report.format, report.family, report.base_model_version) == ("kohya", "sdxl", "sdxl_base_v1-0")
    assert report.groups["unet.down"] == {"rank": [4.0], "alpha": [2.0]}
    assert report.groups["unet.up"] == {"rank": [4.0], "alpha": [2.0]}
    assert report.hashes == {"ss_sd_model_hash": "abc123"}
    assert report.facts["ss_network_dim"] == "4"
    assert report.facts["ss_seed"] == "42"
    assert set(report.loads_in.values()) == {"yes"}
    assert "unet.down        rank 4          alpha 2" in render(report)


def test_diffusers_file_loads_in_comfyui_and_diffusers_not_a1111(
    lora_state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "lora.diffusers.safetensors"
    save_file({f"unet.{k}": v for k, v in lora_state.items()}, str(path))
    report = inspect_lora(path)
    assert (report.format, report.family, report.base_model_version) == ("diffusers", "unknown", None)
    assert report.groups["unet.down"]["rank"] == [4.0]
    assert report.loads_in["AUTOMATIC1111"].startswith("no")
    assert report.loads_in["diffusers"] == "yes"


def test_pickles_and_truncated_files_are_refused(lora_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    ckpt = tmp_path / "lora.ckpt"
    torch.save(lora_state, ckpt)  # a zip holding a pickle
    with pytest.raises(NotSafetensors, match=r"not a safetensors file \(it looks like a zip"):
        inspect_lora(ckpt)
    good = tmp_path / "good.safetensors"
    save_file(lora_state, str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(NotSafetensors, match="truncated"):
        inspect_lora(truncated)


def test_cli_prints_text_and_json_and_refuses_a_ckpt(lora_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    path = tmp_path / "lora.safetensors"
    save_file(to_kohya({"lora_unet": lora_state}, alpha=2.0), str(path))
    text = subprocess.run(
        [sys.executable, "-m", "charlora", "inspect", str(path)], capture_output=True, text=True, check=False
    )
    assert text.returncode == 0, text.stderr
    assert "format:      kohya keys" in text.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "charlora", "inspect", "--json", str(path)], capture_output=True, text=True, check=False
    )
    assert json.loads(as_json.stdout)["groups"]["unet.down"]["rank"] == [4.0]
    ckpt = tmp_path / "x.ckpt"
    torch.save({"a": torch.zeros(1)}, ckpt)
    refused = subprocess.run(
        [sys.executable, "-m", "charlora", "inspect", str(ckpt)], capture_output=True, text=True, check=False
    )
    assert refused.returncode == 2
    assert "only safetensors LoRAs are read" in refused.stderr
