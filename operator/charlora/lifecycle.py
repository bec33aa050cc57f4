"""Pure decisions of the CharacterLoRA lifecycle: version states, the served version, retention, conditions.

Everything here takes models and plain dicts and returns new models: no API or storage calls, so each rule is
unit-tested directly.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from charlora.api.base import Condition
from charlora.api.characterlora import CharacterLoRA, CharacterLoRAStatus, Progress, VersionState
from charlora.artifacts import LORA, Manifest, ProgressReport
from charlora.building import version_number

State = Literal["Pending", "Running", "Succeeded", "Failed"]
TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed"})
CONDITION_TYPES = ("DatasetValid", "Trained", "Serving", "Ready")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


@dataclass(frozen=True)
class JobObservation:
    """What the operator saw of a training Job."""

    state: State
    reason: str | None = None  # why it failed: Job condition reason + message, or the pod's termination message
    bad_input: bool = False  # the trainer exited with the bad-input exit code
    finished_at: datetime.datetime | None = None


def observe_job(job: dict[str, Any], *, termination_message: str | None, bad_input: bool) -> JobObservation:
    """Maps a Job's status (as a dict) to the state of its version."""
    status = job.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        done = conditions.get("Complete") or conditions["SuccessCriteriaMet"]
        return JobObservation("Succeeded", finished_at=_parse_time(done.get("lastTransitionTime")))
    if "Failed" in conditions or "FailureTarget" in conditions:
        failed = conditions.get("Failed") or conditions["FailureTarget"]
        parts = [f"Job {failed.get('reason', 'Failed')}: {failed.get('message', '').strip()}".rstrip(": ")]
        if termination_message:
            parts.append(f"trainer said: {termination_message.strip()}")
        return JobObservation(
            "Failed",
            reason="; ".join(parts),
            bad_input=bad_input,
            finished_at=_parse_time(failed.get("lastTransitionTime")),
        )
    if (status.get("active") or 0) > 0 and not (job.get("spec") or {}).get("suspend"):
        return JobObservation("Running")
    return JobObservation("Pending")


def _parse_time(value: str | None) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def record_success(version: VersionState, manifest: Manifest | None, *, artifact_uri: str) -> VersionState:
    """A succeeded Job becomes a succeeded version only with a manifest that lists the LoRA."""
    if manifest is None:
        return version.model_copy(
            update={"state": "Failed", "reason": f"Job succeeded but wrote no manifest.json under {artifact_uri}"}
        )
    lora = manifest.entry(LORA)
    if lora is None or manifest.version != version.name:
        return version.model_copy(
            update={
                "state": "Failed",
                "reason": f"manifest.json under {artifact_uri} does not describe {LORA} of {version.name}",
            }
        )
    grid = manifest.entry("grid.png")
    return version.model_copy(
        update={
            "state": "Succeeded",
            "artifact_uri": artifact_uri,
            "sha256": lora.sha256,
            "size": lora.size,
            "base_model_uri": manifest.base_model.uri,
            "base_model_version": manifest.base_model.version,
            "epochs": list(manifest.epochs),
            "grid_uri": f"{artifact_uri}{grid.path}" if grid else None,
            "reason": None,
        }
    )


def progress_from_report(report: ProgressReport) -> Progress:
    percent = int(100 * report.step / report.total_steps) if report.total_steps else 0
    eta = None
    if report.eta_seconds is not None:
        minutes, seconds = divmod(int(report.eta_seconds), 60)
        hours, minutes = divmod(minutes, 60)
        eta = f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
    return Progress(
        percent=min(percent, 100),
        step=report.step,
        total_steps=report.total_steps,
        epoch=report.epoch,
        loss=f"{report.loss:.4g}" if report.loss is not None else None,
        eta=eta,
        updated_at=report.updated_at,
    )


def served_version(lora: CharacterLoRA, versions: Sequence[VersionState]) -> tuple[str | None, str, str]:
    """(version to serve, reason, message): the pinned version, else the newest succeeded one."""
    succeeded = [v for v in versions if v.state == "Succeeded"]
    pinned = lora.spec.serving.version
    if pinned:
        match = next((v for v in succeeded if v.name == pinned), None)
        if match is None:
            return None, "PinnedVersionUnavailable", f"spec.serving.version {pinned} has no succeeded version"
        if lora.spec.serving.epoch is not None and lora.spec.serving.epoch not in match.epochs:
            return (
                None,
                "PinnedEpochUnavailable",
                (f"{pinned} has no checkpoint for epoch {lora.spec.serving.epoch} (has {match.epochs})"),
            )
        return pinned, "VersionPinned", f"Serving pinned version {pinned}"
    if not succeeded:
        return None, "NoSucceededVersion", "No version has been trained successfully yet"
    latest = succeeded[-1].name
    return latest, "LatestVersion", f"Serving the latest succeeded version {latest}"


def versions_to_delete(lora: CharacterLoRA, versions: Sequence[VersionState], served: str | None) -> list[str]:
    """Finished versions beyond ``keepVersions``, never the served one or the newest succeeded one."""
    keep = lora.spec.retention.keep_versions
    ordered = sorted(versions, key=lambda v: version_number(v.name))
    newest_succeeded = next((v.name for v in reversed(ordered) if v.state == "Succeeded"), None)
    protected = {served, newest_succeeded}
    surplus = ordered[: max(len(ordered) - keep, 0)]
    return [v.name for v in surplus if v.state in TERMINAL and v.name not in protected]


ConditionStatus = Literal["True", "False", "Unknown"]
ConditionValue = tuple[ConditionStatus, str, str]  # (status, reason, message)


def set_condition(
    conditions: Sequence[Condition],
    *,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
) -> list[Condition]:
    """Replaces one condition; lastTransitionTime moves only when the status changes."""
    previous = next((c for c in conditions if c.type == type_), None)
    changed = previous is None or previous.status != status
    condition = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        observed_generation=generation,
        last_transition_time=now() if changed or previous is None else previous.last_transition_time,
    )
    return [c for c in conditions if c.type != type_] + [condition]


def compute_conditions(
    lora: CharacterLoRA,
    versions: Sequence[VersionState],
    *,
    served: str | None,
    serving_reason: str,
    serving_message: str,
    current_hash: str,
    progress: Progress | None,
) -> list[Condition]:
    """DatasetValid, Trained, Serving and Ready from the versions (Unknown ones first on the first visit)."""
    generation = lora.metadata.generation
    conditions = list(lora.status.conditions) or initial_conditions(lora)
    current = [v for v in versions if v.training_hash == current_hash]
    latest = current[-1] if current else None
    dataset = _dataset_condition(latest, progress)
    trained = _trained_condition(latest, progress)
    serving: ConditionValue = ("True" if served else "False", serving_reason, serving_message)
    ready: ConditionValue
    if served and trained[0] == "True":
        ready = ("True", "Ready", f"Serving {served}")
    elif served:
        ready = ("True", "ServingPreviousVersion", f"Serving {served}; {trained[2]}")
    elif trained[0] != "True":
        ready = ("False", trained[1], trained[2])
    else:
        ready = ("False", serving_reason, serving_message)

    for type_, (status, reason, message) in zip(CONDITION_TYPES, (dataset, trained, serving, ready), strict=True):
        conditions = set_condition(
            conditions, type_=type_, status=status, reason=reason, message=message, generation=generation
        )
    return conditions


def _dataset_condition(latest: VersionState | None, progress: Progress | None) -> ConditionValue:
    if latest is None or (latest.state in ("Pending", "Running") and progress is None):
        return ("Unknown", "NotChecked", "The dataset is checked when the training Job starts")
    if latest.state == "Failed" and latest.bad_input:
        return ("False", "DatasetInvalid", latest.reason or "The trainer refused the dataset")
    return ("True", "DatasetAccepted", f"The trainer accepted the dataset for {latest.name}")


def _trained_condition(latest: VersionState | None, progress: Progress | None) -> ConditionValue:
    if latest is None:
        return ("Unknown", "Pending", "No version has been started for the current spec")
    if latest.state == "Succeeded":
        return ("True", "VersionSucceeded", f"{latest.name} trained successfully")
    if latest.state == "Failed":
        return ("False", "TrainingFailed", f"{latest.name} failed: {latest.reason or 'unknown reason'}")
    if latest.state == "Running":
        done = f" ({progress.percent}%)" if progress else ""
        return ("False", "Training", f"Training {latest.name}{done}")
    return ("False", "JobPending", f"Job {latest.job_name} is waiting to start")


def initial_conditions(lora: CharacterLoRA) -> list[Condition]:
    """Unknown for every condition on the first visit."""
    conditions: list[Condition] = []
    for type_ in CONDITION_TYPES:
        conditions = set_condition(
            conditions,
            type_=type_,
            status="Unknown",
            reason="Reconciling",
            message="First reconcile",
            generation=lora.metadata.generation,
        )
    return conditions


def status_changed(old: CharacterLoRAStatus, new: CharacterLoRAStatus) -> bool:
    return old.to_wire() != new.to_wire()
