"""Fixtures for the real test world: one control plane and one MinIO per session, fresh namespaces and buckets
per test. Nothing here is mocked and nothing is downloaded at test time: the binaries come from
``charlora.devtools`` (prebuilt directories named by environment variables, or the Go build cache)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from charlora.devtools.controlplane import ControlPlane
from charlora.devtools.minio import MinioServer
from charlora.devtools.operating import OperatorProcess, create_credentials_secret
from charlora.devtools.tools import Toolbox
from tests.world import api_client_for, s3_client_for, wait_for

KEEP_FILES = os.environ.get("CHARLORA_KEEP_TEST_WORLD") == "1"
CRDS_DIR = Path(__file__).resolve().parent.parent / "crds"


@pytest.fixture(scope="session")
def toolbox() -> Toolbox:
    return Toolbox()


@pytest.fixture(scope="session")
def control_plane(toolbox: Toolbox) -> Iterator[ControlPlane]:
    plane = ControlPlane(toolbox, keep_files=KEEP_FILES).start()
    print(f"\ncontrol plane up in {plane.startup_seconds:.1f} s at {plane.url} (files: {plane.workdir})")
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def workloads(control_plane: ControlPlane) -> ControlPlane:
    """The control plane plus kube-controller-manager, kube-scheduler and kwok nodes (one with 8 GPUs)."""
    control_plane.start_workloads()
    return control_plane


@pytest.fixture(scope="session")
def kube(control_plane: ControlPlane) -> Iterator[k8s.ApiClient]:
    with api_client_for(control_plane) as api:
        yield api


@pytest.fixture(scope="session")
def crds_installed(kube: k8s.ApiClient) -> list[str]:
    """Applies every CRD in crds/ (as generated) and waits until the apiserver serves them."""
    ext = k8s.ApiextensionsV1Api(kube)
    names = []
    for path in sorted(CRDS_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        try:
            ext.create_custom_resource_definition(crd)
        except k8s.ApiException as err:
            if err.status != 409:
                raise
            existing = ext.read_custom_resource_definition(crd["metadata"]["name"])
            crd["metadata"]["resourceVersion"] = existing.metadata.resource_version
            ext.replace_custom_resource_definition(crd["metadata"]["name"], crd)
        names.append(crd["metadata"]["name"])

    def established() -> bool:
        return all(
            any(
                c.type == "Established" and c.status == "True"
                for c in ext.read_custom_resource_definition(name).status.conditions or []
            )
            for name in names
        )

    wait_for(established, timeout=30, what="CRDs to be established")
    return names


@pytest.fixture
def namespace(kube: k8s.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards."""
    stem = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{secrets.token_hex(3)}"
    core = k8s.CoreV1Api(kube)
    core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture(scope="session")
def minio(toolbox: Toolbox) -> Iterator[MinioServer]:
    server = MinioServer(toolbox, keep_files=KEEP_FILES).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(minio: MinioServer) -> Any:
    return s3_client_for(minio)


@pytest.fixture
def bucket(s3: Any) -> Iterator[str]:
    """A fresh, empty bucket for one test; emptied and removed afterwards."""
    name = f"test-{secrets.token_hex(6)}"
    s3.create_bucket(Bucket=name)
    yield name
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=name, Delete={"Objects": keys})
    s3.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def helm(toolbox: Toolbox, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs the real helm binary with private config/cache/data directories."""
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    binary = toolbox.path("helm")

    def run(*args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        run_env = {**env, "KUBECONFIG": str(kubeconfig)} if kubeconfig else env
        return subprocess.run(
            [str(binary), *args], env=run_env, capture_output=True, text=True, check=check, timeout=300
        )

    return run


@pytest.fixture(scope="session")
def artifacts_bucket(s3: Any) -> str:
    name = "charlora-operator-tests"
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def operator(
    workloads: ControlPlane,
    crds_installed: list[str],
    minio: MinioServer,
    artifacts_bucket: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(workloads, minio, artifacts_bucket, tmp_path_factory.mktemp("operator")).start()
    yield process
    process.stop()


@pytest.fixture
def ns(namespace: str, kube: k8s.ApiClient, minio: MinioServer) -> str:
    """A namespace holding the default credentials Secret the operator and the Jobs use."""
    create_credentials_secret(k8s.CoreV1Api(kube), namespace, minio)
    return namespace
