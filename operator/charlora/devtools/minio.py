"""A real MinIO server on 127.0.0.1 with a private data directory and fresh root credentials."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from charlora.devtools.processes import ManagedProcess, free_port, http_ok
from charlora.devtools.tools import Toolbox


@dataclass
class MinioServer:
    toolbox: Toolbox
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="charlora-minio-")))
    keep_files: bool = False
    access_key: str = field(default_factory=lambda: "charlora-" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    endpoint: str = ""
    process: ManagedProcess | None = None
    startup_seconds: float = 0.0

    def start(self) -> MinioServer:
        started = time.monotonic()
        port, console_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "MINIO_ROOT_USER": self.access_key,
            "MINIO_ROOT_PASSWORD": self.secret_key,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
            "MINIO_CALLHOME_ENABLE": "off",
            # Allows a data directory on the root filesystem, as in CI.
            "MINIO_CI_CD": "on",
            "HOME": str(self.workdir),
        }
        self.process = ManagedProcess(
            "minio",
            [
                str(self.toolbox.path("minio")),
                "server",
                str(self.workdir / "data"),
                "--address",
                f"127.0.0.1:{port}",
                "--console-address",
                f"127.0.0.1:{console_port}",
                "--quiet",
            ],
            self.workdir / "minio.log",
            env=env,
        )
        try:
            self.process.start().wait_ready(lambda: http_ok(f"{self.endpoint}/minio/health/ready"), timeout=60)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if not self.keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)
