"""Entry point: ``python -m charlora_inference --base DIR --table table.yaml`` (also ``charlora serve ...``).

In a cluster: ``--kubernetes-server NAME --host 0.0.0.0 --api-keys /secrets/keys.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Literal

import torch
import uvicorn
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from charlora.storing import S3Settings
from charlora_inference.app import build_app
from charlora_inference.pipelines import DTYPES, SCHEDULERS, FreeU
from charlora_inference.serving import InferenceServer, ServerSettings
from charlora_inference.tables import FileTableSource, ServingTable, start_kubernetes_sources
from charlora_inference.tenants import Tenants

log = logging.getLogger("charlora_inference")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="charlora serve", description=__doc__)
    parser.add_argument("--base", type=Path, required=True, help="diffusers folder of the base model")
    parser.add_argument("--base-family", choices=["sd15", "sdxl"], help="default: from the pipeline class")
    parser.add_argument(
        "--base-version",
        default=os.environ.get("CHARLORA_BASE_VERSION"),
        help="the base-model version LoRAs must have been trained on (env CHARLORA_BASE_VERSION; "
        "default: the name of the --base folder)",
    )
    parser.add_argument("--base-uri", default="", help="where the base came from, for provenance")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--table", type=Path, help="serving table YAML file (watched)")
    source.add_argument("--kubernetes-server", help="watch the table ConfigMaps labelled for this CharacterServer")
    parser.add_argument("--kubernetes-server-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    parser.add_argument("--namespaces", default="", help="comma-separated namespaces to serve; empty: all")
    parser.add_argument("--api-keys", type=Path, help="YAML with hashed API keys (keys: [{name, sha256, namespaces}])")
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="no API keys on a non-loopback --host (without --api-keys, loopback is always anonymous)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="in a pod: 0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: float16 on CUDA, else float32")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), default=None, help="default: the base's own")
    parser.add_argument("--freeu", default="", help="server-default FreeU as s1,s2,b1,b2 (empty: off)")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("CHARLORA_CACHE_DIR", "/tmp/charlora")))
    parser.add_argument("--resident-slots", type=int, default=8, help="unpinned adapters kept on the pipeline")
    parser.add_argument("--cpu-cache-mb", type=int, default=2048)
    parser.add_argument("--disk-cache-mb", type=int, default=20480)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--max-images", type=int, default=8)
    parser.add_argument("--torch-threads", type=int, default=0, help="intra-op CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    loopback = args.host in {"127.0.0.1", "localhost", "::1"}
    if args.api_keys is None and not (args.allow_anonymous or loopback):
        parser.error(f"--host {args.host} is reachable from outside: give --api-keys (or --allow-anonymous)")
    if not args.base_version:
        args.base_version = args.base.resolve().name
    return args


def _cuda() -> bool:
    return bool(torch.cuda.is_available())


def _family(base: Path) -> Literal["sd15", "sdxl"]:
    class_name = json.loads((base / "model_index.json").read_text()).get("_class_name", "")
    return "sdxl" if "XL" in class_name else "sd15"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    freeu = FreeU(*(float(part) for part in args.freeu.split(","))) if args.freeu else None
    settings = ServerSettings(
        base_dir=args.base,
        base_family=args.base_family or _family(args.base),
        base_version=args.base_version,
        base_uri=args.base_uri,
        cache_dir=args.cache_dir,
        device=args.device,
        dtype=args.dtype or ("float16" if args.device.startswith("cuda") else "float32"),
        scheduler=args.scheduler,
        freeu_default=freeu,
        resident_slots=args.resident_slots,
        cpu_cache_bytes=args.cpu_cache_mb << 20,
        disk_cache_bytes=args.disk_cache_mb << 20,
        max_queue=args.max_queue,
        max_images=args.max_images,
        s3=S3Settings.from_env(),
    )
    namespaces = [item for item in args.namespaces.split(",") if item] or None
    table = ServingTable(allowed_namespaces=namespaces)
    server = InferenceServer(settings, table).start()
    if args.table is not None:
        FileTableSource(args.table, table).start()
    else:
        try:
            k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException:
            k8s_config.load_kube_config()  # type: ignore[no-untyped-call]
        start_kubernetes_sources(
            k8s.ApiClient(),
            table,
            server=args.kubernetes_server,
            server_namespace=args.kubernetes_server_namespace,
            namespaces=namespaces,
        )
    tenants = Tenants.from_file(args.api_keys) if args.api_keys is not None else None
    if tenants is None:
        log.warning("No API keys: every caller reaches every namespace")
    log.info("Serving %s (%s) on %s:%d", settings.base_dir, settings.base_version, args.host, args.port)
    uvicorn.run(build_app(server, tenants=tenants), host=args.host, port=args.port, log_level="info")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
