"""Prometheus metrics of the operator (prometheus-client), served on the operator's metrics port."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RECONCILES = Counter("charlora_reconciles_total", "Reconciles run, by kind.", ["kind"])
RECONCILE_ERRORS = Counter("charlora_reconcile_errors_total", "Reconciles that raised, by kind.", ["kind"])
TRAINING_RUNS = Counter("charlora_training_runs_total", "Finished training runs, by outcome.", ["outcome"])
TRAINING_DURATION = Histogram(
    "charlora_training_duration_seconds",
    "Wall time of finished training runs (Job created to finished).",
    buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400),
)
VERSIONS_CREATED = Counter("charlora_versions_created_total", "Versions started (training Jobs created).")
VERSIONS_DELETED = Counter("charlora_versions_deleted_total", "Versions removed by retention.")
SPEC_TO_JOB = Histogram(
    "charlora_spec_change_to_job_seconds",
    "Time from a training-relevant spec change (or creation) to its Job being created.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
