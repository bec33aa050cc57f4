"""A version the real trainer published (tiny SD1.5-like run, file:// store) is served as is: its manifest, its
diffusers-keyed final LoRA and its kohya-keyed epoch checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from charlora.api.serving import ServingEntry
from charlora.artifacts import LORA_DIFFUSERS, MANIFEST, Manifest, epoch_file
from charlora.storing import S3Settings

trainer = pytest.importorskip("charlora_trainer.__main__", reason="needs the trainer package")

from charlora.devtools.datasets import write_kohya_dataset  # noqa: E402
from tests.inference.http import RunningServer, start_server  # noqa: E402
from tests.trainer.conftest import job_config, write_config  # noqa: E402


@pytest.fixture
def published(tiny_base: Path, tmp_path: Path) -> Path:
    """The version folder of a 2-epoch run on the same tiny base the server loads."""
    dataset = write_kohya_dataset(tmp_path / "dataset", folders={"1_anna": 10})
    output = tmp_path / "store" / "team" / "anna" / "v1"
    config = job_config(
        family="sd15",
        model=tiny_base,
        dataset_uri=dataset.as_uri(),
        output_uri=output.as_uri() + "/",
        training={"epochs": 2, "batchSize": 2, "unetLearningRate": "5e-2"},
    )
    config["namespace"], config["character"] = "team", "anna"
    assert (
        trainer.main(["--config", str(write_config(tmp_path / "job.json", config)), "--workdir", str(tmp_path / "w")])
        == 0
    )
    return output


def entry_for(version_dir: Path, *, epoch: int | None = None) -> ServingEntry:
    manifest = Manifest.model_validate_json((version_dir / MANIFEST).read_text())
    listed = manifest.entry(LORA_DIFFUSERS if epoch is None else epoch_file(epoch))
    assert listed is not None
    return ServingEntry(
        namespace=manifest.namespace,
        character=manifest.character,
        version=manifest.version,
        epoch=epoch,
        artifact_uri=version_dir.as_uri() + "/",
        sha256=listed.sha256,
        base_model_family=manifest.base_model.family,
        base_model_version=manifest.base_model.version,
    )


def test_trainer_output_is_served(published: Path, tiny_base: Path, tmp_path: Path) -> None:
    final = entry_for(published)
    epochs = Manifest.model_validate_json((published / MANIFEST).read_text()).epochs
    assert epochs, "the run saved no epoch checkpoints"
    last = entry_for(published, epoch=max(epochs))
    running: RunningServer = start_server(
        base=tiny_base,
        base_version=final.base_model_version,
        workdir=tmp_path / "server",
        s3=S3Settings(),
        entries=[final],
    )
    try:
        running.wait_ready()
        body: dict[str, Any] = {"character": "team/anna", "prompt": "a portrait", "width": 64, "height": 64}
        body |= {"steps": 2, "seed": 5}
        from_final = running.post(body)
        assert from_final.status == 200, from_final.body
        running.set_table([last])
        from_epoch = running.post(body)
        assert from_epoch.status == 200, from_epoch.body
        assert from_epoch.json()["epoch"] == max(epochs)
        # The last epoch's kohya checkpoint holds the final weights: the same picture, up to rounding.
        difference = np.abs(from_epoch.images()[0].astype(int) - from_final.images()[0].astype(int))
        assert difference.max() <= 2, difference.max()
        # And the trained LoRA does something: scale 0 is the bare base model.
        bare = running.post(body | {"lora_scale": 0.0})
        assert np.abs(bare.images()[0].astype(int) - from_final.images()[0].astype(int)).max() > 0
    finally:
        running.stop()
