"""The control plane is a real kube-apiserver: schemas, CEL, RBAC and ServiceAccount tokens are enforced."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from charlora.devtools.controlplane import ControlPlane
from charlora.devtools.tools import KUBERNETES_VERSION, Toolbox
from tests.world import api_client_for, wait_for

GROUP = "smoke.charlora.dev"


def test_apiserver_is_the_pinned_kubernetes_build(kube: k8s.ApiClient) -> None:
    version = k8s.VersionApi(kube).get_code()
    assert version.git_version == KUBERNETES_VERSION


def test_configmap_round_trip(kube: k8s.ApiClient, namespace: str) -> None:
    core = k8s.CoreV1Api(kube)
    core.create_namespaced_config_map(
        namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="anna"), data={"version": "v3"})
    )
    assert core.read_namespaced_config_map("anna", namespace).data == {"version": "v3"}
    names = [cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items]
    assert "anna" in names
    with pytest.raises(ApiException) as conflict:
        core.create_namespaced_config_map(namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="anna")))
    assert conflict.value.status == 409


def _widget_crd() -> dict[str, Any]:
    spec_schema = {
        "type": "object",
        "required": ["size"],
        "properties": {
            "size": {"type": "integer", "minimum": 1, "maximum": 10},
            "family": {"type": "string", "enum": ["sd15", "sdxl"]},
            "minReplicas": {"type": "integer"},
            "maxReplicas": {"type": "integer"},
        },
        "x-kubernetes-validations": [
            {
                "rule": "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
                "message": "minReplicas must not exceed maxReplicas",
                "fieldPath": ".minReplicas",
            },
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": spec_schema}}},
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def widget_crd(kube: k8s.ApiClient) -> str:
    ext = k8s.ApiextensionsV1Api(kube)
    try:
        ext.create_custom_resource_definition(_widget_crd())
    except ApiException as err:
        if err.status != 409:
            raise

    def established() -> bool:
        crd = ext.read_custom_resource_definition(f"widgets.{GROUP}")
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for(established, timeout=30, what="the Widget CRD to be established")
    return "widgets"


def _widget(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}


def test_crd_schema_is_enforced(kube: k8s.ApiClient, namespace: str, widget_crd: str) -> None:
    custom = k8s.CustomObjectsApi(kube)
    created = custom.create_namespaced_custom_object(GROUP, "v1", namespace, widget_crd, _widget("ok", size=3))
    assert created["spec"] == {"size": 3}

    refusals = {
        "size-zero": ({"size": 0}, "spec.size"),
        "size-string": ({"size": "three"}, "spec.size"),
        "family": ({"size": 1, "family": "sd3"}, "spec.family"),
        "missing-size": ({"family": "sd15"}, "spec.size"),
        "cel": ({"size": 1, "minReplicas": 3, "maxReplicas": 2}, "minReplicas must not exceed maxReplicas"),
    }
    for name, (spec, expected) in refusals.items():
        with pytest.raises(ApiException) as refused:
            custom.create_namespaced_custom_object(GROUP, "v1", namespace, widget_crd, _widget(name, **spec))
        assert refused.value.status == 422, name
        assert expected in str(refused.value.body), (name, refused.value.body)
    listed = custom.list_namespaced_custom_object(GROUP, "v1", namespace, widget_crd)["items"]
    assert [item["metadata"]["name"] for item in listed] == ["ok"]


def test_service_account_token_is_bound_by_rbac(
    control_plane: ControlPlane, kube: k8s.ApiClient, namespace: str
) -> None:
    core, rbac = k8s.CoreV1Api(kube), k8s.RbacAuthorizationV1Api(kube)
    core.create_namespaced_service_account(namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="reader")))
    rbac.create_namespaced_role(
        namespace,
        k8s.V1Role(
            metadata=k8s.V1ObjectMeta(name="configmap-reader"),
            rules=[k8s.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["get", "list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        k8s.V1RoleBinding(
            metadata=k8s.V1ObjectMeta(name="reader"),
            role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="configmap-reader"),
            subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="reader", namespace=namespace)],
        ),
    )
    token = core.create_namespaced_service_account_token(
        "reader",
        namespace,
        k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(
                audiences=["https://kubernetes.default.svc.cluster.local"], expiration_seconds=600
            )
        ),
    ).status.token

    with api_client_for(control_plane, token=token) as as_reader:
        review = k8s.AuthenticationV1Api(as_reader).create_self_subject_review(k8s.V1SelfSubjectReview())
        assert review.status.user_info.username == f"system:serviceaccount:{namespace}:reader"
        reader_core = k8s.CoreV1Api(as_reader)
        assert reader_core.list_namespaced_config_map(namespace).items is not None  # allowed by the Role
        for forbidden in (
            lambda: reader_core.list_namespaced_secret(namespace),
            lambda: reader_core.create_namespaced_config_map(
                namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="x"))
            ),
            lambda: reader_core.list_namespaced_config_map("default"),
        ):
            with pytest.raises(ApiException) as refused:
                forbidden()
            assert refused.value.status == 403


def test_bad_credentials_are_refused(control_plane: ControlPlane) -> None:
    with api_client_for(control_plane, token="not-a-real-token") as stranger, pytest.raises(ApiException) as refused:
        k8s.CoreV1Api(stranger).list_namespace()
    assert refused.value.status == 401


def _gpu_job(name: str, *, pod_failure_policy: k8s.V1PodFailurePolicy | None = None) -> k8s.V1Job:
    container = k8s.V1Container(
        name="train",
        image="example.invalid/trainer:1",
        resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}),
    )
    return k8s.V1Job(
        metadata=k8s.V1ObjectMeta(name=name),
        spec=k8s.V1JobSpec(
            backoff_limit=3,
            pod_failure_policy=pod_failure_policy,
            template=k8s.V1PodTemplateSpec(
                spec=k8s.V1PodSpec(
                    restart_policy="Never",
                    containers=[container],
                    tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
                )
            ),
        ),
    )


def _running_pod_of(core: k8s.CoreV1Api, namespace: str, job: str) -> k8s.V1Pod:
    def running() -> k8s.V1Pod | None:
        pods = core.list_namespaced_pod(namespace, label_selector=f"job-name={job}").items
        return next((p for p in pods if p.status.phase == "Running"), None)

    pod: k8s.V1Pod = wait_for(running, timeout=60, what=f"a running pod of Job {job}")
    return pod


def _job_condition(batch: k8s.BatchV1Api, namespace: str, job: str, kind: str) -> k8s.V1JobCondition | None:
    conditions = batch.read_namespaced_job_status(job, namespace).status.conditions or []
    return next((c for c in conditions if c.type == kind and c.status == "True"), None)


@pytest.mark.workloads
def test_job_pod_runs_on_a_gpu_node_until_it_exits(
    workloads: ControlPlane, kube: k8s.ApiClient, namespace: str
) -> None:
    batch, core = k8s.BatchV1Api(kube), k8s.CoreV1Api(kube)
    batch.create_namespaced_job(namespace, _gpu_job("anna-v1"))
    pod = _running_pod_of(core, namespace, "anna-v1")
    assert pod.spec.node_name == "kwok-gpu-0"
    time.sleep(1)  # a running pod stays running until its container "exits"
    assert batch.read_namespaced_job_status("anna-v1", namespace).status.active == 1

    workloads.finish_pod(namespace, pod.metadata.name, exit_code=0)
    wait_for(lambda: _job_condition(batch, namespace, "anna-v1", "Complete"), timeout=60, what="Job complete")
    assert batch.read_namespaced_job_status("anna-v1", namespace).status.succeeded == 1
    finished = core.read_namespaced_pod(pod.metadata.name, namespace)
    assert finished.status.phase == "Succeeded"
    assert finished.status.container_statuses[0].state.terminated.exit_code == 0


@pytest.mark.workloads
def test_pod_failure_policy_fails_the_job_on_a_bad_input_exit_code(
    workloads: ControlPlane, kube: k8s.ApiClient, namespace: str
) -> None:
    batch, core = k8s.BatchV1Api(kube), k8s.CoreV1Api(kube)
    policy = k8s.V1PodFailurePolicy(
        rules=[
            k8s.V1PodFailurePolicyRule(
                action="FailJob",
                on_exit_codes=k8s.V1PodFailurePolicyOnExitCodesRequirement(operator="In", values=[3]),
            )
        ]
    )
    batch.create_namespaced_job(namespace, _gpu_job("bob-v1", pod_failure_policy=policy))
    pod = _running_pod_of(core, namespace, "bob-v1")
    workloads.finish_pod(namespace, pod.metadata.name, exit_code=3, message="dataset: 2 images without captions")

    failed = wait_for(lambda: _job_condition(batch, namespace, "bob-v1", "Failed"), timeout=60, what="Job failed")
    assert failed.reason == "PodFailurePolicy"
    terminated = core.read_namespaced_pod(pod.metadata.name, namespace).status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.message) == (3, "dataset: 2 images without captions")
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=bob-v1").items
    assert len(pods) == 1, "a FailJob exit code must not be retried"


@pytest.mark.workloads
def test_gpu_request_without_capacity_stays_pending(
    workloads: ControlPlane, kube: k8s.ApiClient, namespace: str
) -> None:
    core = k8s.CoreV1Api(kube)
    core.create_namespaced_pod(
        namespace,
        k8s.V1Pod(
            metadata=k8s.V1ObjectMeta(name="greedy"),
            spec=k8s.V1PodSpec(
                containers=[
                    k8s.V1Container(
                        name="c",
                        image="example.invalid/x:1",
                        resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": "64"}),
                    )
                ],
                tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists")],
            ),
        ),
    )

    def unschedulable() -> bool:
        conditions = core.read_namespaced_pod_status("greedy", namespace).status.conditions or []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conditions)

    wait_for(unschedulable, timeout=60, what="the scheduler to refuse a 64-GPU pod")


@pytest.mark.workloads
def test_deployment_becomes_ready(workloads: ControlPlane, kube: k8s.ApiClient, namespace: str) -> None:
    apps = k8s.AppsV1Api(kube)
    labels = {"app": "server"}
    apps.create_namespaced_deployment(
        namespace,
        k8s.V1Deployment(
            metadata=k8s.V1ObjectMeta(name="server"),
            spec=k8s.V1DeploymentSpec(
                replicas=2,
                selector=k8s.V1LabelSelector(match_labels=labels),
                template=k8s.V1PodTemplateSpec(
                    metadata=k8s.V1ObjectMeta(labels=labels),
                    spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="serve", image="example.invalid/serve:1")]),
                ),
            ),
        ),
    )
    deployment = wait_for(
        lambda: (d := apps.read_namespaced_deployment_status("server", namespace)).status.ready_replicas == 2 and d,
        timeout=90,
        what="2 ready replicas",
    )
    assert deployment.status.available_replicas == 2


def test_control_plane_stops_every_process_and_removes_its_files(toolbox: Toolbox) -> None:
    plane = ControlPlane(toolbox).start()
    print(f"\nwarm control-plane start-up: {plane.startup_seconds:.2f} s")
    pids = [process.pid for process in plane.processes]
    assert len(pids) == 2
    assert plane.workdir.exists()
    status, body = plane.request("GET", "/api/v1/namespaces/default")
    assert status == 200
    assert body["metadata"]["name"] == "default"
    plane.stop()
    for pid in pids:
        assert not _alive(pid), f"process {pid} survived stop()"
    assert not plane.workdir.exists()
    port = int(plane.url.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
