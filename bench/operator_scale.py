"""Benchmark: how the operator converges at N CharacterLoRAs against a real kube-apiserver, next to the floor.

For each N: start a fresh control plane (etcd + kube-apiserver) and the real operator (``python -m charlora
operator``), apply N CharacterLoRAs, and time until every one has its Job and a written status; count the API
requests (the apiserver's own ``apiserver_request_total``, minus the benchmark's own calls), the operator's peak RSS,
and the writes per minute once idle. The floor is the plain Python client creating the same N Jobs (the builder's
manifests), one after another, on a fresh control plane.

Run: ``python bench/operator_scale.py [--sizes 100 1000] [--idle-seconds 60]``. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from charlora.api.characterlora import CharacterLoRA
from charlora.api.crd import characterlora_crd
from charlora.building import build_training_job
from charlora.config import OperatorConfig
from charlora.devtools.controlplane import ControlPlane, api_client_for
from charlora.devtools.minio import MinioServer
from charlora.devtools.operating import OperatorProcess
from charlora.devtools.processes import wait_for
from charlora.devtools.tools import Toolbox

GROUP, VERSION, PLURAL = "charlora.dev", "v1alpha1", "characterloras"
WATCHED = ("characterloras", "jobs", "events")
WRITE_VERBS = ("POST", "PUT", "PATCH", "DELETE", "CREATE", "UPDATE", "APPLY")
SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")


@dataclass
class Result:
    label: str
    n: int
    seconds: float
    requests_per_object: float
    peak_rss_mib: float | None = None
    idle_writes_per_minute: float | None = None


def _lora_body(index: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CharacterLoRA",
        "metadata": {"name": f"char-{index:05d}"},
        "spec": {
            "baseModel": {"family": "sdxl", "uri": "s3://models/sdxl/", "version": "sdxl-base-1.0"},
            "dataset": {"uri": f"s3://datasets/char-{index:05d}/"},
        },
    }


def _requests(plane: ControlPlane, *, writes_only: bool = False) -> float:
    """Requests the apiserver has served for CharacterLoRAs, Jobs and Events since it started."""
    _, body = plane.request("GET", "/metrics")
    text = body.get("text", "")
    total = 0.0
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels")))
        if labels.get("resource") not in WATCHED:
            continue
        if writes_only and labels.get("verb") not in WRITE_VERBS:
            continue
        total += float(match.group("value"))
    return total


def _prepare(plane: ControlPlane, api: k8s.ApiClient) -> None:
    extensions: Any = k8s.ApiextensionsV1Api(api)
    extensions.create_custom_resource_definition(characterlora_crd())
    wait_for(lambda: _served(api), timeout=30, what="the CRD")
    k8s.CoreV1Api(api).create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name="bench")))


def _served(api: k8s.ApiClient) -> bool:
    try:
        k8s.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, "bench", PLURAL, limit=1)
    except k8s.ApiException:
        return False
    return True


def _converged(api: k8s.ApiClient, n: int, polls: list[int]) -> bool:
    polls[0] += 2
    batch: Any = k8s.BatchV1Api(api)
    jobs = batch.list_namespaced_job("bench", _preload_content=False)
    loras: Any = k8s.CustomObjectsApi(api).list_namespaced_custom_object(GROUP, VERSION, "bench", PLURAL)
    job_count = len(json.loads(jobs.data)["items"])
    with_status = sum(1 for item in loras["items"] if (item.get("status") or {}).get("versions"))
    return job_count >= n and with_status >= n


def run_operator(toolbox: Toolbox, minio: MinioServer, n: int, idle_seconds: float, workdir: Path) -> Result:
    plane = ControlPlane(toolbox).start()
    operator: OperatorProcess | None = None
    try:
        with api_client_for(plane) as api:
            _prepare(plane, api)
            operator = OperatorProcess(plane, minio, "bench", workdir, progress_interval=30.0).start()
            before = _requests(plane)
            custom = k8s.CustomObjectsApi(api)
            started = time.monotonic()
            for index in range(n):
                custom.create_namespaced_custom_object(GROUP, VERSION, "bench", PLURAL, _lora_body(index))
            polls = [0]
            wait_for(lambda: _converged(api, n, polls), timeout=900, what=f"{n} objects to converge")
            seconds = time.monotonic() - started
            operator_requests = _requests(plane) - before - n - polls[0]
            writes_before = _requests(plane, writes_only=True)
            time.sleep(idle_seconds)
            idle_writes = (_requests(plane, writes_only=True) - writes_before) * 60.0 / idle_seconds
            rss = _peak_rss_mib(operator.process.pid if operator.process else 0)
            return Result("operator", n, seconds, operator_requests / n, rss, idle_writes)
    finally:
        if operator is not None:
            operator.stop()
        plane.stop()


def run_floor(toolbox: Toolbox, n: int) -> Result:
    plane = ControlPlane(toolbox).start()
    try:
        with api_client_for(plane) as api:
            _prepare(plane, api)
            config = OperatorConfig()
            jobs = []
            for index in range(n):
                body = _lora_body(index)
                body["metadata"].update({"namespace": "bench", "uid": f"uid-{index}", "generation": 1})
                jobs.append(build_training_job(CharacterLoRA.model_validate(body), version="v1", config=config))
            batch: Any = k8s.BatchV1Api(api)  # raw dicts in, raw JSON out: the cheapest plain-client path
            before = _requests(plane)
            started = time.monotonic()
            for job in jobs:
                batch.create_namespaced_job("bench", job, _preload_content=False)
            seconds = time.monotonic() - started
            return Result("floor: plain client, N Jobs", n, seconds, (_requests(plane) - before) / n)
    finally:
        plane.stop()


def _peak_rss_mib(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    args = parser.parse_args()
    toolbox = Toolbox()
    toolbox.ensure_all()
    minio = MinioServer(toolbox).start()
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="charlora-bench-") as work:
            for n in args.sizes:
                floor = run_floor(toolbox, n)
                operator = run_operator(toolbox, minio, n, args.idle_seconds, Path(work))
                results += [floor, operator]
                print(_table([floor, operator]), flush=True)
    finally:
        minio.stop()
    print("\nAll sizes:")
    print(_table(results))


def _table(results: list[Result]) -> str:
    floors = {r.n: r.seconds for r in results if r.label.startswith("floor")}
    fmt: Callable[[float | None, str], str] = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = [
        f"{'run':<30} {'N':>6} {'seconds':>8} {'x floor':>8} {'req/obj':>8} {'peak RSS MiB':>13} "
        f"{'idle writes/min':>16}"
    ]
    for r in results:
        ratio = r.seconds / floors[r.n] if floors.get(r.n) else None
        lines.append(
            f"{r.label:<30} {r.n:>6} {r.seconds:>8.2f} {fmt(ratio, '.2f'):>8} "
            f"{r.requests_per_object:>8.2f} {fmt(r.peak_rss_mib, '.0f'):>13} "
            f"{fmt(r.idle_writes_per_minute, '.1f'):>16}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
