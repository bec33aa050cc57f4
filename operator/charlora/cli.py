"""The ``charlora`` command line: ``operator``, ``train`` (the trainer, run locally) and ``serve`` (the server)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from charlora.api.trainingjob import BAD_INPUT_EXIT_CODE


def _run_operator(args: argparse.Namespace) -> int:
    import asyncio

    import kopf
    from prometheus_client import start_http_server

    from charlora import reconciling  # noqa: F401  (registers the handlers)

    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.metrics_address)
    kopf.configure(verbose=args.verbose)
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace or (),
            liveness_endpoint=f"http://{args.metrics_address}:{args.health_port}/healthz" if args.health_port else None,
        )
    )
    return 0


def _import_kohya(args: argparse.Namespace) -> int:
    import yaml

    from charlora.importing import ImportRefused, import_kohya, read_kohya

    try:
        text = args.config.read_text()
    except OSError as err:
        print(f"error: cannot read {args.config}: {err.strerror}", file=sys.stderr)
        return 2
    try:
        result = import_kohya(
            read_kohya(text, filename=args.config.name),
            name=args.name,
            dataset=args.dataset,
            base_model_uri=args.base_model_uri,
            base_model_version=args.base_model_version,
            namespace=args.namespace,
        )
    except ImportRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for line in result.not_carried:
        print(f"not carried over: {line}", file=sys.stderr)
    rendered = yaml.safe_dump(result.manifest, sort_keys=False)
    if args.output:
        args.output.write_text(rendered)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(rendered, end="")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import json

    from charlora.inspecting import NotSafetensors, inspect_lora, render

    try:
        report = inspect_lora(args.lora)
    except FileNotFoundError:
        print(f"error: no such file: {args.lora}", file=sys.stderr)
        return 2
    except NotSafetensors as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2) if args.json else render(report))
    return 0


def _lint_dataset(args: argparse.Namespace) -> int:
    from charlora.api.characterlora import DEFAULT_RESOLUTION
    from charlora.storing import S3Settings, StorageError
    from charlora_trainer.failing import BadInput
    from charlora_trainer.reporting import lint_target, render_lint

    resolution = args.resolution or DEFAULT_RESOLUTION[args.family]
    try:
        dataset, report, sizes = lint_target(
            args.dataset,
            resolution=resolution,
            min_images=args.min_images,
            character_token=args.character_token,
            caption_extension=args.caption_extension,
            repeats=args.repeats,
            settings=S3Settings.from_env(),
        )
    except (FileNotFoundError, BadInput, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.model_dump_json(by_alias=True, indent=2) if args.json else render_lint(dataset, report, sizes=sizes))
    return 0 if report.ok else BAD_INPUT_EXIT_CODE


def _run_trainer(rest: list[str]) -> int:
    from charlora_trainer.__main__ import main as trainer_main

    return trainer_main(rest)


def _run_server(rest: list[str]) -> int:
    from charlora_inference.__main__ import main as server_main

    return server_main(rest)


# Subcommands that own their whole argument list (their --help is their own).
PASS_THROUGH = {"train": _run_trainer, "serve": _run_server}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASS_THROUGH:
        return PASS_THROUGH[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(prog="charlora", description="Character LoRAs on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)
    op = sub.add_parser(
        "operator",
        help="run the operator",
        description="Run the operator against the cluster of $KUBECONFIG (or in-cluster credentials). "
        "Defaults come from CHARLORA_* environment variables (see charlora.config.OperatorConfig).",
        epilog="Example: CHARLORA_S3_ENDPOINT=http://minio:9000 charlora operator --namespace companions",
    )
    op.add_argument("--namespace", action="append", help="watch only this namespace (repeatable; default: all)")
    op.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0 disables)")
    op.add_argument("--metrics-address", default="0.0.0.0", help="address of the metrics and health endpoints")
    op.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port (0 disables)")
    op.add_argument("--verbose", action="store_true")
    op.set_defaults(run=_run_operator)
    kohya = sub.add_parser(
        "import-kohya",
        help="turn a kohya_ss GUI JSON export or an sd-scripts TOML config into a CharacterLoRA",
        description="Print a CharacterLoRA manifest from a Kohya configuration. Settings without a counterpart are "
        "listed on stderr, one per line with the reason; <tune> placeholders refuse the import.",
        epilog="Example: charlora import-kohya kohya-config.json --name anna --dataset s3://datasets/anna/ "
        "--base-model-uri s3://models/sdxl-base-1.0/ --base-model-version sdxl-base-1.0 -o anna-lora.yaml",
    )
    kohya.add_argument("config", type=Path, help="kohya_ss GUI export (.json) or sd-scripts config (.toml)")
    kohya.add_argument("--name", required=True, help="name of the CharacterLoRA (the character)")
    kohya.add_argument("--dataset", required=True, help="dataset URI: s3://bucket/prefix/ or file:///path")
    kohya.add_argument("--base-model-uri", required=True, help="where the trainer loads the base model from")
    kohya.add_argument("--base-model-version", required=True, help="e.g. sdxl-base-1.0")
    kohya.add_argument("--namespace", help="metadata.namespace of the manifest")
    kohya.add_argument("-o", "--output", type=Path, help="write the manifest here instead of stdout")
    kohya.set_defaults(run=_import_kohya)
    inspect = sub.add_parser(
        "inspect",
        help="describe a LoRA file: format, family, rank/alpha, base model, hashes, where it loads",
        description="Read a .safetensors LoRA's header (never unpickling anything) and describe it.",
        epilog="Example: charlora inspect lora.safetensors    (--json for machine-readable output)",
    )
    inspect.add_argument("lora", type=Path, help="a .safetensors LoRA file")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(run=_inspect)
    lint = sub.add_parser(
        "lint-dataset",
        help="run the trainer's dataset lint on a local folder or an s3:// prefix",
        description="Check a Kohya-layout dataset (N_name/ folders, same-named caption files) exactly as the "
        f"trainer does before training. Exits {BAD_INPUT_EXIT_CODE} when the trainer would refuse it.",
        epilog="Example: charlora lint-dataset ./datasets/anna --family sdxl --character-token anna\n"
        "         charlora lint-dataset s3://datasets/anna/   (credentials and endpoint from AWS_* / "
        "CHARLORA_S3_ENDPOINT)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lint.add_argument("dataset", help="a local directory, file:///path or s3://bucket/prefix/")
    lint.add_argument("--family", choices=["sd15", "sdxl"], default="sdxl", help="sets the default resolution")
    lint.add_argument("--resolution", type=int, help="training resolution in px (default 512 sd15, 1024 sdxl)")
    lint.add_argument("--min-images", type=int, default=10, help="fewer images than this is fatal (default 10)")
    lint.add_argument("--character-token", help="warn about captions that name the character")
    lint.add_argument("--caption-extension", default=".txt")
    lint.add_argument("--repeats", type=int, default=1, help="repeats for images in a flat folder")
    lint.add_argument("--json", action="store_true", help="print lint.json instead of the report")
    lint.set_defaults(run=_lint_dataset)
    # Listed for --help only: main() hands their arguments to the trainer and the server untouched.
    sub.add_parser("train", help="train one version locally, as the training Job does: charlora train --config F")
    sub.add_parser("serve", help="run the inference server: charlora serve --base DIR --table table.yaml")
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
