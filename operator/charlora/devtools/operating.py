"""Runs the real operator (``python -m charlora operator``) as a child process against the test world."""

from __future__ import annotations

import base64
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client as k8s

from charlora.devtools.controlplane import ControlPlane
from charlora.devtools.minio import MinioServer
from charlora.devtools.processes import ManagedProcess, free_port


@dataclass
class OperatorProcess:
    control_plane: ControlPlane
    minio: MinioServer
    bucket: str
    workdir: Path
    progress_interval: float = 1.0
    process: ManagedProcess | None = None
    metrics_port: int = field(default_factory=free_port)
    starts: int = 0

    def start(self) -> OperatorProcess:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.control_plane.kubeconfig),
            "CHARLORA_S3_ENDPOINT": self.minio.endpoint,
            "CHARLORA_S3_BUCKET": self.bucket,
            "CHARLORA_S3_PREFIX": "loras",
            "CHARLORA_PROGRESS_INTERVAL_SECONDS": str(self.progress_interval),
            "CHARLORA_TRAINER_IMAGE": "registry.example/charlora-trainer:test",
        }
        self.starts += 1
        self.process = ManagedProcess(
            "charlora-operator",
            [
                sys.executable,
                "-m",
                "charlora",
                "operator",
                "--metrics-port",
                str(self.metrics_port),
                "--metrics-address",
                "127.0.0.1",
                "--health-port",
                "0",
            ],
            self.workdir / f"operator-{self.starts}.log",
            env=env,
        ).start()
        self.process.wait_ready(self._metrics_up, timeout=60)
        return self

    def _metrics_up(self) -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as resp:
            return bool(resp.status == 200)

    def kill(self) -> None:
        """SIGKILL, as a crashed or evicted operator pod."""
        if self.process is not None:
            self.process.stop(grace=0)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def metric(self, name: str) -> float:
        """Sum of a metric's samples (all label sets) from the live /metrics endpoint."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def log_tail(self) -> str:
        return self.process.log_tail(60) if self.process else ""


def create_credentials_secret(
    core: k8s.CoreV1Api, namespace: str, minio: MinioServer, name: str = "charlora-s3"
) -> None:
    """The Secret the operator and its training Jobs read the test MinIO's credentials from."""
    data = {"AWS_ACCESS_KEY_ID": minio.access_key, "AWS_SECRET_ACCESS_KEY": minio.secret_key}
    core.create_namespaced_secret(
        namespace,
        k8s.V1Secret(
            metadata=k8s.V1ObjectMeta(name=name),
            data={key: base64.b64encode(value.encode()).decode() for key, value in data.items()},
        ),
    )
