"""kopf handlers: one idempotent reconcile of a CharacterLoRA, wired to create/resume/update and a progress timer.

Read top to bottom: validate the body, ensure the version for the current spec has its Job, observe unfinished
versions (Job state, progress.json, manifest.json), choose the served version, apply retention, compute the
conditions, and patch status (through the status subresource) only when something changed.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import kopf
from pydantic import ValidationError

from charlora import metrics
from charlora.api.base import GROUP, VERSION
from charlora.api.characterlora import KIND, PLURAL, CharacterLoRA, CharacterLoRAStatus, Progress, VersionState
from charlora.artifacts import MANIFEST, PROGRESS, Manifest, ProgressReport
from charlora.building import (
    TRAINING_HASH_ANNOTATION,
    build_training_job,
    credentials_secret,
    job_name,
    s3_endpoint,
    training_hash,
    version_location,
    version_name,
    version_number,
)
from charlora.cluster import Cluster, ClusterError
from charlora.config import OperatorConfig
from charlora.lifecycle import (
    TERMINAL,
    compute_conditions,
    observe_job,
    progress_from_report,
    record_success,
    served_version,
    status_changed,
    versions_to_delete,
)
from charlora.storing import NotFound, ObjectStore, S3Settings, StorageError, open_store

Logger = logging.Logger | logging.LoggerAdapter[Any]
STARTUP_CONFIG = OperatorConfig.from_env()  # decorator arguments (timer interval) are fixed at import
CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
STORE_CACHE_SECONDS = 60.0


@dataclass
class Runtime:
    """What the handlers share, kept in kopf's memo rather than in module globals."""

    config: OperatorConfig
    cluster: Cluster
    _locks: defaultdict[str, threading.Lock] = field(default_factory=lambda: defaultdict(threading.Lock))
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _stores: dict[tuple[str, str | None, str | None], tuple[float, ObjectStore]] = field(default_factory=dict)

    def lock_for(self, uid: str) -> threading.Lock:
        # The timer and the change handlers of one object may run at once in kopf's thread pool.
        with self._guard:
            return self._locks[uid]

    def store_for(self, lora: CharacterLoRA) -> ObjectStore:
        """The object store of ``lora``, with credentials from its Secret (cached for a minute)."""
        namespace = lora.metadata.namespace or "default"
        secret = credentials_secret(lora, self.config)
        endpoint = s3_endpoint(lora, self.config)
        key = (namespace, secret, endpoint)
        cached = self._stores.get(key)
        if cached and time.monotonic() - cached[0] < STORE_CACHE_SECONDS:
            return cached[1]
        credentials = self.cluster.read_secret_keys(namespace, secret, CREDENTIAL_KEYS) if secret else {}
        store = open_store(
            "s3://",
            S3Settings(
                endpoint=endpoint,
                access_key=credentials.get("AWS_ACCESS_KEY_ID"),
                secret_key=credentials.get("AWS_SECRET_ACCESS_KEY"),
                region=self.config.s3_region,
            ),
        )
        self._stores[key] = (time.monotonic(), store)
        return store


@kopf.on.startup()
def configure(*, settings: kopf.OperatorSettings, memo: Any, logger: Logger, **_: Any) -> None:
    # kopf keeps its bookkeeping in annotations: status has a structural schema that would prune it.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/artifacts"
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 16
    settings.watching.server_timeout = 600
    memo.runtime = Runtime(config=STARTUP_CONFIG, cluster=Cluster.connect())
    logger.info("Started the charlora operator (trainer image %s)", STARTUP_CONFIG.trainer_image)


def _has_unfinished_version(status: kopf.Status, **_: Any) -> bool:
    versions: list[dict[str, Any]] = status.get("versions") or []
    return any(v.get("state") not in TERMINAL for v in versions)


def _deletes_artifacts(spec: kopf.Spec, **_: Any) -> bool:
    return bool((spec.get("retention") or {}).get("deletionPolicy") == "Delete")


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile_on_change(*, body: kopf.Body, patch: kopf.Patch, logger: Logger, memo: Any, **_: Any) -> None:
    reconcile(body, patch=patch, logger=logger, runtime=memo.runtime)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=STARTUP_CONFIG.progress_interval_seconds,
    initial_delay=STARTUP_CONFIG.progress_interval_seconds,  # the change handler has just looked
    when=_has_unfinished_version,
)
def reconcile_on_timer(*, body: kopf.Body, patch: kopf.Patch, logger: Logger, memo: Any, **_: Any) -> None:
    reconcile(body, patch=patch, logger=logger, runtime=memo.runtime)


def reconcile(body: kopf.Body, *, patch: kopf.Patch, logger: Logger, runtime: Runtime) -> None:
    metrics.RECONCILES.labels(KIND).inc()
    try:
        lora = CharacterLoRA.from_body(body)
    except ValidationError as err:
        metrics.RECONCILE_ERRORS.labels(KIND).inc()
        raise kopf.PermanentError(f"Invalid CharacterLoRA: {err}") from err
    with runtime.lock_for(lora.metadata.uid or lora.metadata.name):
        try:
            _reconcile(lora, body=body, patch=patch, logger=logger, runtime=runtime)
        except (ClusterError, StorageError) as err:
            metrics.RECONCILE_ERRORS.labels(KIND).inc()
            raise kopf.TemporaryError(str(err), delay=30) from err


def _reconcile(lora: CharacterLoRA, *, body: kopf.Body, patch: kopf.Patch, logger: Logger, runtime: Runtime) -> None:
    current_hash = training_hash(lora)
    versions = list(lora.status.versions)
    just_created: dict[str, dict[str, Any]] = {}
    if not versions or versions[-1].training_hash != current_hash:
        versions, just_created = _ensure_version(
            lora, versions, current_hash=current_hash, body=body, logger=logger, runtime=runtime
        )

    progress: Progress | None = None
    for index, version in enumerate(versions):
        if version.state not in TERMINAL:
            versions[index], progress = _observe(
                lora, version, job=just_created.get(version.job_name), body=body, logger=logger, runtime=runtime
            )

    served, serving_reason, serving_message = served_version(lora, versions)
    versions = _apply_retention(lora, versions, served=served, body=body, logger=logger, runtime=runtime)

    conditions = compute_conditions(
        lora,
        versions,
        served=served,
        serving_reason=serving_reason,
        serving_message=serving_message,
        current_hash=current_hash,
        progress=progress,
    )
    succeeded = [v.name for v in versions if v.state == "Succeeded"]
    new_status = CharacterLoRAStatus(
        observed_generation=lora.metadata.generation,
        conditions=conditions,
        versions=versions,
        latest_version=succeeded[-1] if succeeded else None,
        served_version=served,
        progress=progress,
    )
    if status_changed(lora.status, new_status):
        old, new = lora.status.to_wire(), new_status.to_wire()
        for key in old.keys() - new.keys():
            patch.status[key] = None
        for key, value in new.items():
            patch.status[key] = value


def _ensure_version(
    lora: CharacterLoRA,
    versions: list[VersionState],
    *,
    current_hash: str,
    body: kopf.Body,
    logger: Logger,
    runtime: Runtime,
) -> tuple[list[VersionState], dict[str, dict[str, Any]]]:
    """Creates the Job of the next version, or adopts it when a previous run created it but crashed before
    recording it (deterministic names: never two Jobs for one version). Also returns the Jobs as stored, so
    they are observed without reading them again."""
    number = max((version_number(v.name) for v in versions), default=0) + 1
    jobs: dict[str, dict[str, Any]] = {}
    while True:
        name = version_name(number)
        job = build_training_job(lora, version=name, config=runtime.config)
        stored, created = runtime.cluster.create_job_if_absent(job)
        owners = {ref.get("uid") for ref in stored["metadata"].get("ownerReferences") or []}
        if lora.metadata.uid not in owners:
            raise ClusterError(f"Job {stored['metadata']['name']} exists but belongs to another object")
        job_hash = (stored["metadata"].get("annotations") or {}).get(TRAINING_HASH_ANNOTATION)
        jobs[stored["metadata"]["name"]] = stored
        versions = [
            *versions,
            VersionState(
                name=name,
                generation=lora.metadata.generation or 0,
                job_name=job_name(lora.metadata.name, name),
                state="Pending",
                started_at=_timestamp(stored["metadata"].get("creationTimestamp")),
                training_hash=job_hash,
                artifact_uri=version_location(lora, name, runtime.config).uri,
            ),
        ]
        if created:
            metrics.VERSIONS_CREATED.inc()
            metrics.SPEC_TO_JOB.observe(_seconds_since_spec_change(body))
            logger.info("Created Job %s for version %s", stored["metadata"]["name"], name)
            kopf.info(body, reason="Created", message=f"Created Job {stored['metadata']['name']} for {name}")
        else:
            logger.info("Adopted existing Job %s as version %s", stored["metadata"]["name"], name)
        if job_hash == current_hash:
            return versions, jobs
        number += 1


def _observe(
    lora: CharacterLoRA,
    version: VersionState,
    *,
    job: dict[str, Any] | None,
    body: kopf.Body,
    logger: Logger,
    runtime: Runtime,
) -> tuple[VersionState, Progress | None]:
    """The version's new state from its Job (``job`` when the caller has just read it) and object storage."""
    namespace = lora.metadata.namespace or "default"
    location = version_location(lora, version.name, runtime.config)
    if job is None:
        job = runtime.cluster.read_job(namespace, version.job_name)
    if job is None:
        failed = version.model_copy(
            update={
                "state": "Failed",
                "reason": f"Job {version.job_name} was deleted before it finished",
                "finished_at": _now(),
            }
        )
        return _finished(failed, body=body, logger=logger), None
    observation = observe_job(job, termination_message=None, bad_input=False)
    if observation.state == "Failed":
        message, bad_input = runtime.cluster.job_termination(namespace, version.job_name)
        observation = observe_job(job, termination_message=message, bad_input=bad_input)
    if observation.state == "Succeeded":
        manifest = _read_manifest(runtime.store_for(lora), location.file(MANIFEST))
        done = record_success(version, manifest, artifact_uri=location.uri)
        return _finished(
            done.model_copy(update={"finished_at": observation.finished_at or _now()}), body=body, logger=logger
        ), None
    if observation.state == "Failed":
        failed = version.model_copy(
            update={
                "state": "Failed",
                "reason": observation.reason,
                "bad_input": observation.bad_input,
                "finished_at": observation.finished_at or _now(),
            }
        )
        return _finished(failed, body=body, logger=logger), None
    progress = None
    if observation.state == "Running":
        progress = _read_progress(runtime.store_for(lora), location.file(PROGRESS))
    return version.model_copy(update={"state": observation.state}), progress


def _finished(version: VersionState, *, body: kopf.Body, logger: Logger) -> VersionState:
    outcome = version.state.lower()
    metrics.TRAINING_RUNS.labels(outcome).inc()
    if version.started_at and version.finished_at:
        metrics.TRAINING_DURATION.observe(max((version.finished_at - version.started_at).total_seconds(), 0.0))
    if version.state == "Succeeded":
        logger.info("Recorded succeeded version %s", version.name)
        kopf.info(body, reason="Succeeded", message=f"Version {version.name} trained ({version.sha256})")
    else:
        logger.warning("Recorded failed version %s: %s", version.name, version.reason)
        kopf.warn(body, reason="Failed", message=f"Version {version.name} failed: {version.reason}")
    return version


def _apply_retention(
    lora: CharacterLoRA,
    versions: list[VersionState],
    *,
    served: str | None,
    body: kopf.Body,
    logger: Logger,
    runtime: Runtime,
) -> list[VersionState]:
    doomed = set(versions_to_delete(lora, versions, served))
    if not doomed:
        return versions
    store = runtime.store_for(lora)
    for name in sorted(doomed, key=version_number):
        removed = store.delete_prefix(version_location(lora, name, runtime.config).uri)
        metrics.VERSIONS_DELETED.inc()
        logger.info("Deleted version %s (%d objects) beyond keepVersions", name, removed)
        kopf.info(
            body,
            reason="Deleted",
            message=f"Deleted version {name}: keepVersions is {lora.spec.retention.keep_versions}",
        )
    return [v for v in versions if v.name not in doomed]


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_deletes_artifacts)
def delete_artifacts(*, body: kopf.Body, logger: Logger, memo: Any, **_: Any) -> None:
    """deletionPolicy Delete: remove every artifact of the character before the object goes away."""
    runtime: Runtime = memo.runtime
    lora = CharacterLoRA.from_body(body)
    prefix = version_location(lora, "v1", runtime.config).character_uri
    try:
        removed = runtime.store_for(lora).delete_prefix(prefix)
    except (ClusterError, StorageError) as err:
        raise kopf.TemporaryError(f"Could not delete artifacts under {prefix}: {err}", delay=30) from err
    logger.info("Deleted %d artifact objects under %s", removed, prefix)


def _read_manifest(store: ObjectStore, uri: str) -> Manifest | None:
    try:
        return Manifest.model_validate_json(store.read_bytes(uri))
    except NotFound:
        return None
    except ValidationError:
        return None  # an unreadable manifest does not describe a usable version


def _read_progress(store: ObjectStore, uri: str) -> Progress | None:
    try:
        return progress_from_report(ProgressReport.model_validate_json(store.read_bytes(uri)))
    except (NotFound, ValidationError):
        return None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _timestamp(value: str | None) -> datetime.datetime | None:
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _seconds_since_spec_change(body: kopf.Body) -> float:
    """From the last write of the spec (managedFields time, else creation) to now."""
    times = [
        entry.get("time")
        for entry in body.get("metadata", {}).get("managedFields") or []
        if entry.get("subresource") != "status" and "f:spec" in (entry.get("fieldsV1") or {})
    ]
    latest = max((t for t in times if t), default=body.get("metadata", {}).get("creationTimestamp"))
    changed = _timestamp(latest)
    return max((_now() - changed).total_seconds(), 0.0) if changed else 0.0
