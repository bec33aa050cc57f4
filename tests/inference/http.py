"""A real server for tests: the FastAPI app under uvicorn on 127.0.0.1 (a thread of the test process), a watched
table file, hashed API keys, and a small urllib client (real HTTP, no TestClient)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
import yaml
from PIL import Image

from charlora.api.serving import ServingEntry
from charlora.storing import S3Settings
from charlora_inference.app import build_app
from charlora_inference.pipelines import FreeU
from charlora_inference.serving import InferenceServer, ServerSettings
from charlora_inference.tables import FileTableSource, KubernetesTableSource, ServingTable
from charlora_inference.tenants import Tenants, hash_key

KEYS = {"team-key": ["team"], "other-key": ["other"], "admin-key": ["*"]}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def images(self) -> list[np.ndarray]:
        return [decode_png(base64.b64decode(item["b64_json"])) for item in self.json()["data"]]

    def png_text(self, index: int = 0) -> dict[str, str]:
        raw = base64.b64decode(self.json()["data"][index]["b64_json"]) if self.json_like else self.body
        image = Image.open(io.BytesIO(raw))
        image.load()
        return dict(image.text)  # type: ignore[attr-defined]

    @property
    def json_like(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/json")


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def call(url: str, *, body: dict[str, Any] | None = None, key: str | None = None, timeout: float = 120) -> Reply:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


@dataclass
class RunningServer:
    url: str
    server: InferenceServer
    table_path: Path
    source: FileTableSource | KubernetesTableSource
    _uvicorn: uvicorn.Server
    _thread: threading.Thread
    entries: dict[str, ServingEntry] = field(default_factory=dict)

    def set_table(self, entries: list[ServingEntry]) -> None:
        """Rewrites the table file and waits until the server applied it."""
        write_table(self.table_path, entries)
        wanted = {entry.key: entry for entry in entries}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if {entry.key: entry for entry in self.server.table.entries()} == wanted:
                return
            time.sleep(0.02)
        raise AssertionError("the server did not apply the table within 5 s")

    def post(self, body: dict[str, Any], *, key: str | None = "team-key") -> Reply:
        return call(f"{self.url}/v1/images/generations", body=body, key=key)

    def get(self, path: str, *, key: str | None = None) -> Reply:
        return call(f"{self.url}{path}", key=key)

    def metric(self, name: str, **labels: str) -> float:
        found = self.server.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get("/readyz").status == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"not ready after {timeout} s: {self.get('/readyz').body!r}")

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=10)
        self.source.stop()
        self.server.stop()


def write_table(path: Path, entries: list[ServingEntry]) -> None:
    """Replaces the table file atomically (write, then rename), as a ConfigMap volume does."""
    partial = path.with_suffix(".partial")
    partial.write_text(yaml.safe_dump({"entries": [entry.to_wire() for entry in entries]}))
    partial.replace(path)


def start_server(
    *,
    base: Path,
    base_version: str,
    workdir: Path,
    s3: S3Settings,
    entries: list[ServingEntry],
    resident_slots: int = 4,
    max_queue: int = 16,
    freeu_default: FreeU | None = None,
    kube: Any = None,
) -> RunningServer:
    """Starts a server; with ``kube`` (an API client) the table comes from the ConfigMap watch for server ``srv``
    in namespace ``serving`` instead of the table file."""
    workdir.mkdir(parents=True, exist_ok=True)
    keys_path = workdir / "keys.yaml"
    keys_path.write_text(
        yaml.safe_dump(
            {
                "keys": [
                    {"name": f"holder-{spaces[0]}", "sha256": hash_key(raw), "namespaces": spaces}
                    for raw, spaces in KEYS.items()
                ]
            }
        )
    )
    assert "team-key" not in keys_path.read_text()  # only hashes are stored
    table_path = workdir / "table.yaml"
    write_table(table_path, entries)
    settings = ServerSettings(
        base_dir=base,
        base_family="sd15",
        base_version=base_version,
        cache_dir=workdir / "cache",
        scheduler="euler",
        resident_slots=resident_slots,
        max_queue=max_queue,
        freeu_default=freeu_default,
        s3=s3,
    )
    table = ServingTable()
    server = InferenceServer(settings, table).start()
    source: FileTableSource | KubernetesTableSource
    if kube is None:
        source = FileTableSource(table_path, table, interval=0.05).start()
    else:
        source = KubernetesTableSource(kube, table, server="srv", server_namespace="serving").start()
    app = build_app(server, tenants=Tenants.from_file(keys_path))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    runner = uvicorn.Server(config)
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not runner.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert runner.started, "uvicorn did not start"
    return RunningServer(f"http://127.0.0.1:{port}", server, table_path, source, runner, thread)
