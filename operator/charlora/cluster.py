"""The one module the operator uses to call the Kubernetes API (kopf's own watches and patches aside).

Writes are idempotent: a Job is created if absent, and a 409 means it is already there.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from charlora.api.trainingjob import BAD_INPUT_EXIT_CODE


class ClusterError(RuntimeError):
    """An API call failed for a reason retrying may fix (the message says which call)."""


class Cluster:
    """Typed wrappers over the few calls the reconcile makes."""

    def __init__(self, api: k8s.ApiClient) -> None:
        # Typed as Any: raw JSON replies (_preload_content=False) are faster at scale than model objects, and the
        # generated stubs do not describe that mode.
        self._batch: Any = k8s.BatchV1Api(api)
        self._core: Any = k8s.CoreV1Api(api)

    @classmethod
    def connect(cls) -> Cluster:
        """In-cluster credentials when running in a pod, else the kubeconfig ($KUBECONFIG)."""
        try:
            k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException:
            k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
        return cls(k8s.ApiClient())

    def create_job_if_absent(self, job: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(the Job as stored, whether this call created it)."""
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        try:
            reply = self._batch.create_namespaced_job(namespace, job, _preload_content=False)
            return json.loads(reply.data), True
        except ApiException as err:
            if err.status != 409:
                raise ClusterError(f"Could not create Job {namespace}/{name}: {err.status} {err.reason}") from err
        existing = self.read_job(namespace, name)
        if existing is None:  # deleted between the 409 and the read: the next reconcile creates it
            raise ClusterError(f"Job {namespace}/{name} vanished while being adopted")
        return existing, False

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            reply = self._batch.read_namespaced_job(name, namespace, _preload_content=False)
        except ApiException as err:
            if err.status == 404:
                return None
            raise ClusterError(f"Could not read Job {namespace}/{name}: {err.status} {err.reason}") from err
        job: dict[str, Any] = json.loads(reply.data)
        return job

    def job_termination(self, namespace: str, job: str) -> tuple[str | None, bool]:
        """(the last termination message of the Job's trainer containers, whether one exited as bad input)."""
        try:
            reply = self._core.list_namespaced_pod(
                namespace, label_selector=f"batch.kubernetes.io/job-name={job}", _preload_content=False
            )
        except ApiException as err:
            raise ClusterError(f"Could not list pods of Job {namespace}/{job}: {err.status} {err.reason}") from err
        items: list[dict[str, Any]] = json.loads(reply.data).get("items", [])
        pods = sorted(items, key=lambda p: p["metadata"].get("creationTimestamp", ""))
        message: str | None = None
        bad_input = False
        for pod in pods:
            for status in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (status.get("state") or {}).get("terminated") or {}
                if terminated.get("exitCode", 0) != 0:
                    bad_input = bad_input or terminated["exitCode"] == BAD_INPUT_EXIT_CODE
                    message = (terminated.get("message") or "").strip() or message
        return message, bad_input

    def read_secret_keys(self, namespace: str, name: str, keys: tuple[str, ...]) -> dict[str, str]:
        """The decoded values of ``keys`` in a Secret; a missing Secret or key is a ClusterError naming it."""
        try:
            secret = self._core.read_namespaced_secret(name, namespace)
        except ApiException as err:
            raise ClusterError(f"Could not read Secret {namespace}/{name}: {err.status} {err.reason}") from err
        data = secret.data or {}
        missing = [key for key in keys if key not in data]
        if missing:
            raise ClusterError(f"Secret {namespace}/{name} has no key {', '.join(missing)}")
        return {key: base64.b64decode(data[key]).decode() for key in keys}
