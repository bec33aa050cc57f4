"""``python -m charlora.devtools demo``: the operator's whole lifecycle on this machine, no cluster needed.

Starts the test world (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok nodes with GPUs,
MinIO), installs the CRDs from crds/, runs the real operator, applies examples/anna-lora.yaml and
examples/minimal-sd15.yaml, and plays the trainer's side: progress for anna, then a successful v1 for anna and a
refused dataset for bob. Prints what ``kubectl`` shows at each step, then tears everything down.
"""

from __future__ import annotations

import base64
import os
import subprocess
import tempfile
import time
from pathlib import Path

from kubernetes import client as k8s

from charlora.devtools.controlplane import ControlPlane, api_client_for
from charlora.devtools.minio import MinioServer
from charlora.devtools.operating import OperatorProcess
from charlora.devtools.processes import wait_for
from charlora.devtools.standin import write_artifacts, write_progress
from charlora.devtools.tools import Toolbox

NAMESPACE = "companions"
BUCKET = "charlora"


def run_demo(repo: Path) -> None:
    toolbox = Toolbox()
    kubectl = str(toolbox.path("kubectl"))
    plane = ControlPlane(toolbox).start()
    minio = MinioServer(toolbox).start()
    operator: OperatorProcess | None = None
    try:
        plane.start_workloads()
        env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig)}

        def kubectl_run(*args: str) -> None:
            print(f"\n$ kubectl {' '.join(args)}", flush=True)
            subprocess.run([kubectl, *args], env=env, check=False)

        import boto3  # noqa: PLC0415 - only the demo needs a raw client, to play the trainer

        s3 = boto3.client(
            "s3",
            endpoint_url=minio.endpoint,
            aws_access_key_id=minio.access_key,
            aws_secret_access_key=minio.secret_key,
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket=BUCKET)
        with api_client_for(plane) as api:
            core = k8s.CoreV1Api(api)
            kubectl_run("apply", "-f", str(repo / "crds"))
            wait_for(lambda: _crd_served(api), timeout=30, what="the CharacterLoRA CRD")
            core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=NAMESPACE)))
            core.create_namespaced_secret(
                NAMESPACE,
                k8s.V1Secret(
                    metadata=k8s.V1ObjectMeta(name="charlora-s3"),
                    data={
                        "AWS_ACCESS_KEY_ID": base64.b64encode(minio.access_key.encode()).decode(),
                        "AWS_SECRET_ACCESS_KEY": base64.b64encode(minio.secret_key.encode()).decode(),
                    },
                ),
            )
            with tempfile.TemporaryDirectory(prefix="charlora-demo-") as work:
                operator = OperatorProcess(plane, minio, BUCKET, Path(work), progress_interval=1.0).start()
                kubectl_run(
                    "apply",
                    "-n",
                    NAMESPACE,
                    "-f",
                    str(repo / "examples" / "anna-lora.yaml"),
                    "-f",
                    str(repo / "examples" / "minimal-sd15.yaml"),
                )
                anna = wait_for(lambda: _running_pod(core, "anna-v1"), timeout=60, what="anna's training pod")
                bob = wait_for(lambda: _running_pod(core, "bob-v1"), timeout=60, what="bob's training pod")
                write_progress(s3, BUCKET, f"loras/{NAMESPACE}/anna/v1/", step=420, total=1200, epoch=5, loss=0.0813)
                time.sleep(3)
                kubectl_run("get", "characterloras,jobs", "-n", NAMESPACE)

                write_artifacts(
                    s3, BUCKET, f"loras/{NAMESPACE}/anna/v1/", namespace=NAMESPACE, name="anna", version="v1"
                )
                plane.finish_pod(NAMESPACE, anna, exit_code=0)
                plane.finish_pod(
                    NAMESPACE,
                    bob,
                    exit_code=3,
                    message="dataset lint: 2 images have no caption: 5_bob/001.png, 5_bob/007.png",
                )
                time.sleep(5)
                kubectl_run("get", "clora", "-n", NAMESPACE)
                kubectl_run(
                    "get",
                    "clora",
                    "bob",
                    "-n",
                    NAMESPACE,
                    "-o",
                    'jsonpath={.status.conditions[?(@.type=="DatasetValid")].message}{"\\n"}',
                )
                kubectl_run("describe", "clora", "anna", "-n", NAMESPACE)
    finally:
        if operator is not None:
            operator.stop()
        minio.stop()
        plane.stop()


def _crd_served(api: k8s.ApiClient) -> bool:
    try:
        k8s.CustomObjectsApi(api).list_cluster_custom_object("charlora.dev", "v1alpha1", "characterloras", limit=1)
    except k8s.ApiException:
        return False
    return True


def _running_pod(core: k8s.CoreV1Api, job: str) -> str | None:
    pods = core.list_namespaced_pod(NAMESPACE, label_selector=f"job-name={job}").items
    return next((str(p.metadata.name) for p in pods if p.metadata and p.status and p.status.phase == "Running"), None)
