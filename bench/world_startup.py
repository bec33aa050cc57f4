"""Benchmark: how long the test world takes to come up (control plane, control plane + workloads, MinIO).

Run: ``python bench/world_startup.py [--runs 5]``. Prints median and spread per part; binaries must already be
built (``python -m charlora.devtools ensure``), so this measures a warm start, which is what every test session pays.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from charlora.devtools.controlplane import ControlPlane
from charlora.devtools.minio import MinioServer
from charlora.devtools.tools import Toolbox


def _control_plane(toolbox: Toolbox, *, workloads: bool) -> float:
    started = time.monotonic()
    plane = ControlPlane(toolbox).start()
    try:
        if workloads:
            plane.start_workloads()
        return time.monotonic() - started
    finally:
        plane.stop()


def _minio(toolbox: Toolbox) -> float:
    server = MinioServer(toolbox).start()
    server.stop()
    return server.startup_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    toolbox = Toolbox()
    toolbox.ensure_all()
    parts: dict[str, Callable[[], float]] = {
        "etcd + kube-apiserver": lambda: _control_plane(toolbox, workloads=False),
        "same + kcm, scheduler, kwok, 2 nodes": lambda: _control_plane(toolbox, workloads=True),
        "minio": lambda: _minio(toolbox),
    }
    print(f"{'part':<36} {'median s':>9} {'min s':>7} {'max s':>7}  (runs={args.runs})")
    for name, measure in parts.items():
        samples = [measure() for _ in range(args.runs)]
        print(f"{name:<36} {statistics.median(samples):>9.2f} {min(samples):>7.2f} {max(samples):>7.2f}")


if __name__ == "__main__":
    main()
