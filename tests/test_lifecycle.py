"""Pure lifecycle rules: Job state mapping, manifests, served version, retention and conditions."""

from __future__ import annotations

import datetime
from typing import Any

from charlora.api.characterlora import CharacterLoRA, VersionState
from charlora.artifacts import Manifest, ManifestBaseModel, ManifestFile, ProgressReport
from charlora.lifecycle import (
    compute_conditions,
    observe_job,
    progress_from_report,
    record_success,
    served_version,
    set_condition,
    versions_to_delete,
)

T0 = datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)


def _lora(**spec: Any) -> CharacterLoRA:
    return CharacterLoRA.model_validate(
        {
            "metadata": {"name": "anna", "namespace": "ns", "generation": 4},
            "spec": {
                "baseModel": {"family": "sd15", "uri": "s3://m/", "version": "sd-1.5"},
                "dataset": {"uri": "s3://d/anna/"},
                **spec,
            },
        }
    )


def _v(number: int, state: str, *, epochs: list[int] | None = None, hash_: str = "h") -> VersionState:
    return VersionState(
        name=f"v{number}",
        generation=number,
        job_name=f"anna-v{number}",
        state=state,
        epochs=epochs or [],
        training_hash=hash_,
    )


def test_job_states() -> None:
    assert observe_job({"status": {}}, termination_message=None, bad_input=False).state == "Pending"
    assert observe_job({"status": {"active": 1}}, termination_message=None, bad_input=False).state == "Running"
    suspended = {"spec": {"suspend": True}, "status": {"active": 1}}
    assert observe_job(suspended, termination_message=None, bad_input=False).state == "Pending"
    done = {
        "status": {"conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": "2026-11-01T00:00:00Z"}]}
    }
    observed = observe_job(done, termination_message=None, bad_input=False)
    assert (observed.state, observed.finished_at) == ("Succeeded", T0)
    failed = {
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "DeadlineExceeded",
                    "message": "Job was active longer than specified deadline",
                }
            ]
        }
    }
    observed = observe_job(failed, termination_message="killed at step 40", bad_input=False)
    assert observed.state == "Failed"
    assert observed.reason == (
        "Job DeadlineExceeded: Job was active longer than specified deadline; trainer said: killed at step 40"
    )


def _manifest(version: str, *, with_lora: bool = True) -> Manifest:
    files = [ManifestFile(path="lora.safetensors", sha256="a" * 64, size=123)] if with_lora else []
    return Manifest(
        namespace="ns",
        character="anna",
        version=version,
        base_model=ManifestBaseModel(family="sd15", uri="s3://m/", version="sd-1.5"),
        files=files,
        epochs=[1, 2],
        created_at=T0,
    )


def test_success_needs_a_manifest_describing_the_lora() -> None:
    version = _v(3, "Running")
    recorded = record_success(version, _manifest("v3"), artifact_uri="s3://b/p/ns/anna/v3/")
    assert (recorded.state, recorded.sha256, recorded.size, recorded.epochs) == ("Succeeded", "a" * 64, 123, [1, 2])
    assert record_success(version, None, artifact_uri="s3://x/").state == "Failed"
    assert "does not describe" in (record_success(version, _manifest("v2"), artifact_uri="s3://x/").reason or "")
    assert record_success(version, _manifest("v3", with_lora=False), artifact_uri="s3://x/").state == "Failed"


def test_progress_formatting() -> None:
    progress = progress_from_report(
        ProgressReport(step=250, total_steps=1000, epoch=3, loss=0.123456, eta_seconds=3725.0, updated_at=T0)
    )
    assert (progress.percent, progress.loss, progress.eta) == (25, "0.1235", "1h02m05s")
    assert progress_from_report(ProgressReport(step=0, total_steps=0, epoch=0, updated_at=T0)).percent == 0


def test_served_version_prefers_the_pin_and_checks_the_epoch() -> None:
    versions = [_v(1, "Succeeded", epochs=[2, 4]), _v(2, "Failed"), _v(3, "Succeeded"), _v(4, "Running")]
    assert served_version(_lora(), versions)[0] == "v3"
    assert served_version(_lora(serving={"version": "v1"}), versions)[:2] == ("v1", "VersionPinned")
    assert served_version(_lora(serving={"version": "v2"}), versions)[:2] == (None, "PinnedVersionUnavailable")
    assert served_version(_lora(serving={"version": "v1", "epoch": 3}), versions)[:2] == (
        None,
        "PinnedEpochUnavailable",
    )
    assert served_version(_lora(), [_v(1, "Failed")])[:2] == (None, "NoSucceededVersion")


def test_retention_keeps_newest_served_and_unfinished() -> None:
    versions = [_v(1, "Succeeded"), _v(2, "Failed"), _v(3, "Succeeded"), _v(4, "Succeeded"), _v(5, "Running")]
    lora = _lora(retention={"keepVersions": 2})
    assert versions_to_delete(lora, versions, served="v4") == ["v1", "v2", "v3"]
    assert versions_to_delete(lora, versions, served="v1") == ["v2", "v3"]
    assert versions_to_delete(_lora(retention={"keepVersions": 5}), versions, served="v4") == []
    # the newest succeeded version survives even when it is older than keepVersions allows
    assert (
        versions_to_delete(_lora(retention={"keepVersions": 1}), [_v(1, "Succeeded"), _v(2, "Failed")], served=None)
        == []
    )


def test_conditions_follow_the_versions() -> None:
    lora = _lora()
    conditions = compute_conditions(
        lora,
        [],
        served=None,
        serving_reason="NoSucceededVersion",
        serving_message="none",
        current_hash="h",
        progress=None,
    )
    by_type = {c.type: c for c in conditions}
    assert [by_type[t].status for t in ("DatasetValid", "Trained", "Serving", "Ready")] == [
        "Unknown",
        "Unknown",
        "False",
        "False",
    ]
    assert all(c.observed_generation == 4 for c in conditions)

    bad = _v(1, "Failed").model_copy(update={"bad_input": True, "reason": "no captions: a.png"})
    by_type = {
        c.type: c
        for c in compute_conditions(
            lora,
            [bad],
            served=None,
            serving_reason="NoSucceededVersion",
            serving_message="none",
            current_hash="h",
            progress=None,
        )
    }
    assert (by_type["DatasetValid"].status, by_type["DatasetValid"].reason) == ("False", "DatasetInvalid")
    assert "no captions: a.png" in by_type["DatasetValid"].message
    assert by_type["Trained"].reason == "TrainingFailed"


def test_transition_time_moves_only_on_status_change() -> None:
    first = set_condition([], type_="Ready", status="False", reason="A", message="a", generation=1)
    earlier = first[0].model_copy(update={"last_transition_time": T0})
    same = set_condition([earlier], type_="Ready", status="False", reason="B", message="b", generation=2)
    assert same[0].last_transition_time == T0
    assert (same[0].reason, same[0].observed_generation) == ("B", 2)
    flipped = set_condition([earlier], type_="Ready", status="True", reason="Ready", message="", generation=2)
    assert flipped[0].last_transition_time > T0
