"""A stand-in kubelet for one kwok pod: runs the pod's container command as a local process.

kwok pods never run containers. For end-to-end tests the container's command (the trainer's entry point) runs here
with the environment the pod spec gives it (Secret references resolved through the API, emptyDir mount paths mapped
to a local directory), and its exit code and termination message are what the test then reports for the pod.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from charlora.devtools.controlplane import ControlPlane
from charlora.devtools.processes import wait_for

TRAINER_COMMAND = [sys.executable, "-m", "charlora_trainer"]  # the trainer image's entry point


@dataclass(frozen=True)
class LocalRun:
    exit_code: int
    termination_message: str
    stderr: str


def pod_environment(core: k8s.CoreV1Api, namespace: str, pod: Any, *, mounts: dict[str, Path]) -> dict[str, str]:
    """The first container's environment, with secretKeyRef values read and mount paths mapped onto ``mounts``."""
    env: dict[str, str] = {}
    for var in pod.spec.containers[0].env or []:
        if var.value is not None:
            value = var.value
        elif var.value_from is not None and var.value_from.secret_key_ref is not None:
            ref = var.value_from.secret_key_ref
            secret = core.read_namespaced_secret(ref.name, namespace)
            value = base64.b64decode((secret.data or {})[ref.key]).decode()
        else:
            continue
        for mount_path, local in mounts.items():
            if value == mount_path or value.startswith(mount_path + "/"):
                value = str(local) + value[len(mount_path) :]
        env[var.name] = value
    return env


def run_pod_locally(
    core: k8s.CoreV1Api,
    namespace: str,
    pod_name: str,
    *,
    command: list[str],
    workdir: Path,
    timeout: float = 600,
) -> LocalRun:
    """Runs ``command`` as the pod's container would run, in ``workdir``; returns how it ended."""
    pod: Any = core.read_namespaced_pod(pod_name, namespace)
    mounts = {mount.mount_path: workdir / mount.name for mount in pod.spec.containers[0].volume_mounts or []}
    for local in mounts.values():
        local.mkdir(parents=True, exist_ok=True)
    termination_log = workdir / "termination-log"
    env = {
        "PATH": os.environ.get("PATH", ""),
        **pod_environment(core, namespace, pod, mounts=mounts),
        "CHARLORA_TERMINATION_LOG": str(termination_log),
    }
    for directory in ("TMPDIR", "HF_HOME"):
        if directory in env:
            Path(env[directory]).mkdir(parents=True, exist_ok=True)
    done = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout, check=False)
    message = termination_log.read_text().strip() if termination_log.exists() else ""
    return LocalRun(done.returncode, message or done.stderr.strip()[-4000:], done.stderr)


def wait_for_running_pod(core: k8s.CoreV1Api, namespace: str, job: str, *, timeout: float = 60) -> str:
    """The name of a Running pod of ``job`` (kwok starts it once the scheduler placed it)."""

    def running() -> str | None:
        pods: Any = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
        return next((str(p.metadata.name) for p in pods if p.status.phase == "Running"), None)

    pod: str = wait_for(running, timeout=timeout, what=f"a running pod of Job {job}")
    return pod


def run_job_locally(
    plane: ControlPlane,
    core: k8s.CoreV1Api,
    namespace: str,
    job: str,
    *,
    workdir: Path,
    command: list[str] = TRAINER_COMMAND,
    timeout: float = 900,
) -> LocalRun:
    """Waits for the Job's pod, runs its container command here, and ends the pod the way the command ended."""
    pod = wait_for_running_pod(core, namespace, job)
    run = run_pod_locally(core, namespace, pod, command=command, workdir=workdir, timeout=timeout)
    plane.finish_pod(namespace, pod, exit_code=run.exit_code, message=run.termination_message)
    return run
