"""``python -m charlora.devtools demo``: the whole lifecycle on this machine, no cluster and no GPU needed.

Starts the test world (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok nodes, MinIO), installs
the CRDs from crds/, runs the real operator, and applies two CharacterLoRAs on a tiny random SD1.5-like base model
with generated datasets in MinIO: ``anna`` (a good dataset) and ``bob`` (an image without a caption). When each
training Job's pod starts on its kwok node, the real trainer runs as a local process with the pod's environment
(charlora.devtools.kubelet) and the pod ends with the trainer's exit code. Prints what ``kubectl`` shows at each
step, then tears everything down.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

from charlora.devtools.controlplane import ControlPlane, api_client_for
from charlora.devtools.datasets import upload_tree, write_kohya_dataset
from charlora.devtools.kubelet import run_job_locally
from charlora.devtools.minio import MinioServer
from charlora.devtools.operating import OperatorProcess, create_credentials_secret
from charlora.devtools.processes import wait_for
from charlora.devtools.tiny_models import build_tiny_pipeline, tiny_character
from charlora.devtools.tools import Toolbox

NAMESPACE = "companions"
DEMO_TRAINING = {"epochs": 4, "saveEveryNEpochs": 2, "gridCfgScales": ["4", "7"]}
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
            create_credentials_secret(core, NAMESPACE, minio)
            with tempfile.TemporaryDirectory(prefix="charlora-demo-") as work_dir:
                work = Path(work_dir)
                base = build_tiny_pipeline("sd15", work / "tiny-sd15")
                anna_data = write_kohya_dataset(work / "anna", folders={"4_anna": 8})
                bob_data = write_kohya_dataset(work / "bob", folders={"4_bob": 8}, seed=1)
                (bob_data / "4_bob" / "img003.txt").unlink()  # the mistake the trainer's lint catches
                manifests = work / "characters.yaml"
                manifests.write_text(
                    yaml.safe_dump_all(
                        [
                            tiny_character(
                                "anna",
                                base=base,
                                dataset=upload_tree(s3, BUCKET, anna_data, "datasets/anna"),
                                **DEMO_TRAINING,
                            ),
                            tiny_character(
                                "bob",
                                base=base,
                                dataset=upload_tree(s3, BUCKET, bob_data, "datasets/bob"),
                                **DEMO_TRAINING,
                            ),
                        ],
                        sort_keys=False,
                    )
                )
                print(f"\n# {manifests.name}: two characters on a tiny random SD1.5-like base\n{manifests.read_text()}")

                operator = OperatorProcess(plane, minio, BUCKET, work / "operator", progress_interval=1.0).start()
                kubectl_run("apply", "-n", NAMESPACE, "-f", str(manifests))
                runs = {
                    name: threading.Thread(
                        target=run_job_locally,
                        args=(plane, core, NAMESPACE, f"{name}-v1"),
                        kwargs={"workdir": work / f"pod-{name}"},
                        daemon=True,
                    )
                    for name in ("anna", "bob")
                }
                for thread in runs.values():
                    thread.start()
                time.sleep(8)
                kubectl_run("get", "characterloras,jobs", "-n", NAMESPACE)
                for thread in runs.values():
                    thread.join(timeout=900)
                wait_for(lambda: _finished(api, ("anna", "bob")), timeout=60, what="both versions to be recorded")
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


def _finished(api: k8s.ApiClient, names: tuple[str, ...]) -> bool:
    custom: Any = k8s.CustomObjectsApi(api)
    for name in names:
        versions = (
            custom.get_namespaced_custom_object("charlora.dev", "v1alpha1", NAMESPACE, "characterloras", name).get(
                "status"
            )
            or {}
        ).get("versions") or []
        if not versions or versions[-1]["state"] not in ("Succeeded", "Failed"):
            return False
    return True


def _crd_served(api: k8s.ApiClient) -> bool:
    try:
        k8s.CustomObjectsApi(api).list_cluster_custom_object("charlora.dev", "v1alpha1", "characterloras", limit=1)
    except k8s.ApiException:
        return False
    return True
