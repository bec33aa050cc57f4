"""A real Kubernetes control plane on 127.0.0.1: etcd + kube-apiserver, optionally the workload controllers.

``ControlPlane.start()`` brings up etcd and kube-apiserver with per-run certificates, an admin client certificate,
service-account signing keys (TokenRequest works) and RBAC authorization. ``start_workloads()`` adds
kube-controller-manager, kube-scheduler and kwok with fake nodes, so Jobs and Deployments progress: pods are
scheduled and become Ready; a running pod ends when a test annotates it with the exit code it should report
(see ``kwok-stages.yaml`` and ``finish_pod``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from charlora.devtools.pki import ControlPlanePKI, write_control_plane_pki
from charlora.devtools.processes import ManagedProcess, StartupError, free_port, http_ok
from charlora.devtools.tools import Toolbox

SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.0.0.0/24"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"
KWOK_STAGES = Path(__file__).with_name("kwok-stages.yaml")
EXIT_CODE_ANNOTATION = "kwok.charlora.dev/exit-code"
MESSAGE_ANNOTATION = "kwok.charlora.dev/message"


@dataclass(frozen=True)
class FakeNode:
    """A kwok-managed node: it never runs a container, but its pods are reported Running / Succeeded."""

    name: str
    gpus: int = 0
    cpu: str = "32"
    memory: str = "256Gi"
    labels: dict[str, str] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        capacity = {"cpu": self.cpu, "memory": self.memory, "pods": "110", "ephemeral-storage": "500Gi"}
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            **self.labels,
        }
        taints: list[dict[str, str]] = []
        if self.gpus:
            capacity[GPU_RESOURCE] = str(self.gpus)
            labels["nvidia.com/gpu.present"] = "true"
            # GPU pools are commonly tainted so that only pods asking for GPUs land there.
            taints.append({"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"})
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels, "annotations": {KWOK_NODE_ANNOTATION: "fake"}},
            "spec": {"taints": taints},
            "status": {
                "capacity": capacity,
                "allocatable": capacity,
                "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "fake"},
            },
        }


DEFAULT_NODES = (FakeNode("kwok-gpu-0", gpus=8), FakeNode("kwok-cpu-0"))


@dataclass
class ControlPlane:
    """etcd + kube-apiserver (+ workload controllers on demand) in a private temporary directory."""

    toolbox: Toolbox
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="charlora-cp-")))
    keep_files: bool = False
    processes: list[ManagedProcess] = field(default_factory=list)
    pki: ControlPlanePKI | None = None
    url: str = ""
    kubeconfig: Path | None = None
    startup_seconds: float = 0.0
    workloads_running: bool = False

    def start(self) -> ControlPlane:
        started = time.monotonic()
        try:
            self.pki = write_control_plane_pki(self.workdir / "pki")
            etcd_url = self._start_etcd()
            self._start_apiserver(etcd_url)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _start_etcd(self) -> str:
        client_port, peer_port = free_port(), free_port()
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd = ManagedProcess(
            "etcd",
            [
                str(self.toolbox.path("etcd")),
                "--name=charlora-test",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=charlora-test={peer_url}",
                "--unsafe-no-fsync",  # test data is thrown away; fsync would dominate start-up and writes
                "--log-level=warn",
            ],
            self.workdir / "logs" / "etcd.log",
        )
        self.processes.append(etcd.start())
        etcd.wait_ready(lambda: http_ok(f"{client_url}/health"), timeout=30)
        return client_url

    def _start_apiserver(self, etcd_url: str) -> None:
        assert self.pki is not None
        port = free_port()
        self.url = f"https://127.0.0.1:{port}"
        apiserver = ManagedProcess(
            "kube-apiserver",
            [
                str(self.toolbox.path("kube-apiserver")),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={self.pki.serving.cert}",
                f"--tls-private-key-file={self.pki.serving.key}",
                f"--client-ca-file={self.pki.ca.cert}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={self.pki.service_account_pub}",
                f"--service-account-signing-key-file={self.pki.service_account_key}",
                "--authorization-mode=RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # The "kubernetes" Service's endpoints would point at 127.0.0.1, which is meaningless to pods.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
            ],
            self.workdir / "logs" / "kube-apiserver.log",
        )
        self.processes.append(apiserver.start())
        self.kubeconfig = self._write_kubeconfig()
        apiserver.wait_ready(lambda: self.request("GET", "/readyz")[0] == 200, timeout=60)

    def _write_kubeconfig(self) -> Path:
        assert self.pki is not None
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "charlora-test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.pki.ca.cert)},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(self.pki.admin.cert),
                        "client-key": str(self.pki.admin.key),
                    },
                }
            ],
            "contexts": [{"name": "charlora-test", "context": {"cluster": "charlora-test", "user": "admin"}}],
            "current-context": "charlora-test",
        }
        path = self.workdir / "admin.kubeconfig"
        path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML: any kubeconfig reader accepts it
        path.chmod(0o600)
        return path

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        content_type: str = "application/json",
    ) -> tuple[int, dict[str, Any]]:
        """One admin request to the apiserver with the standard library (the fixtures' own bootstrap path)."""
        assert self.pki is not None
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        context.load_cert_chain(str(self.pki.admin.cert), str(self.pki.admin.key))
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.url}{path}", data=data, method=method, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(req, context=context, timeout=10) as resp:
                raw = resp.read()
                return resp.status, _json_or_text(raw)
        except urllib.error.HTTPError as err:
            return err.code, _json_or_text(err.read())

    def start_workloads(self, nodes: tuple[FakeNode, ...] = DEFAULT_NODES) -> None:
        """Adds kube-controller-manager, kube-scheduler and kwok, and registers ``nodes``; idempotent."""
        if self.workloads_running:
            return
        assert self.pki is not None
        assert self.kubeconfig is not None
        kcm = ManagedProcess(
            "kube-controller-manager",
            [
                str(self.toolbox.path("kube-controller-manager")),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
                "--use-service-account-credentials=false",
                f"--root-ca-file={self.pki.ca.cert}",
                f"--service-account-private-key-file={self.pki.service_account_key}",
                "--cluster-name=charlora-test",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,"
                "-node-route-controller,-persistentvolume-binder,-attachdetach,-persistentvolume-expander",
                "--concurrent-job-syncs=10",
            ],
            self.workdir / "logs" / "kube-controller-manager.log",
        )
        scheduler = ManagedProcess(
            "kube-scheduler",
            [
                str(self.toolbox.path("kube-scheduler")),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--secure-port=0",
            ],
            self.workdir / "logs" / "kube-scheduler.log",
        )
        kwok = ManagedProcess(
            "kwok",
            [
                str(self.toolbox.path("kwok")),
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                "--node-ip=10.1.0.1",
                "--cidr=10.2.0.0/16",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{free_port()}",
                f"--config={KWOK_STAGES}",
            ],
            self.workdir / "logs" / "kwok.log",
            # kwok reads ~/.kwok/kwok.yaml when present: a private HOME keeps a developer's config out of tests.
            env={**os.environ, "HOME": str(self.workdir / "kwok-home")},
        )
        for process in (kcm, scheduler, kwok):
            self.processes.append(process.start())
        for node in nodes:
            status, reply = self.request("POST", "/api/v1/nodes", node.manifest())
            if status not in (201, 409):
                raise StartupError(f"Could not register fake node {node.name}: {status} {reply}")
        for node in nodes:
            kwok.wait_ready(functools.partial(self._node_ready, node.name), timeout=60)
        kcm.wait_ready(self._default_service_account_exists, timeout=60)
        scheduler.wait_ready(scheduler.running, timeout=5)
        self.workloads_running = True

    def finish_pod(self, namespace: str, name: str, *, exit_code: int = 0, message: str = "") -> None:
        """Ends a running kwok pod as if its container exited with ``exit_code`` and wrote ``message``."""
        annotations = {EXIT_CODE_ANNOTATION: str(exit_code), MESSAGE_ANNOTATION: message}
        status, reply = self.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{name}",
            {"metadata": {"annotations": annotations}},
            content_type="application/merge-patch+json",
        )
        if status != 200:
            raise RuntimeError(f"Could not finish pod {namespace}/{name}: {status} {reply}")

    def _node_ready(self, name: str) -> bool:
        status, node = self.request("GET", f"/api/v1/nodes/{name}")
        conditions = node.get("status", {}).get("conditions", []) if status == 200 else []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        # The node-lifecycle controller lifts the not-ready taint the apiserver put on the new node.
        tainted = any(t.get("key") == "node.kubernetes.io/not-ready" for t in node.get("spec", {}).get("taints", []))
        return ready and not tainted

    def _default_service_account_exists(self) -> bool:
        # The service-account controller creates "default" in every namespace: proof that kcm is working.
        return self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200

    def stop(self) -> None:
        """Stops every process it started (in reverse order) and removes its files unless ``keep_files``."""
        for process in reversed(self.processes):
            process.stop()
        if not self.keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _json_or_text(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        return {"text": raw.decode(errors="replace")}
    return value if isinstance(value, dict) else {"value": value}


def api_client_for(plane: ControlPlane, *, token: str | None = None) -> k8s.ApiClient:
    """An API client as the admin (client certificate) or, with ``token``, as whoever the token names."""
    assert plane.pki is not None
    config = k8s.Configuration()
    config.host = plane.url
    config.ssl_ca_cert = str(plane.pki.ca.cert)
    if token is None:
        config.cert_file = str(plane.pki.admin.cert)
        config.key_file = str(plane.pki.admin.key)
    else:
        config.api_key = {"authorization": f"Bearer {token}"}
    return k8s.ApiClient(config)
