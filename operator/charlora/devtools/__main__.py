"""Command line: ``python -m charlora.devtools ensure`` builds or locates every tool and prints where it is."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from charlora.devtools.tools import ALL_TOOLS, Toolbox, ToolError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m charlora.devtools",
        description="Locate or build the binaries of the test world (etcd, kube-apiserver, "
        "kube-controller-manager, kube-scheduler, kubectl, kwok, helm, minio).",
        epilog="Example: python -m charlora.devtools ensure          # build what is missing, print paths\n"
        "         python -m charlora.devtools ensure --only helm\n"
        "         python -m charlora.devtools demo            # the operator on a local test world",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ensure = sub.add_parser("ensure", help="locate or build the tools and print where each one is")
    ensure.add_argument("--only", action="append", choices=ALL_TOOLS, help="only this tool (repeatable)")
    sub.add_parser("demo", help="run the operator's lifecycle on a local test world and show kubectl's view")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from charlora.devtools.demo import run_demo  # noqa: PLC0415 - needs kubernetes and boto3

        run_demo(Path(__file__).resolve().parents[3])
        return 0

    toolbox = Toolbox()
    started = time.monotonic()
    names = args.only or list(ALL_TOOLS)
    try:
        located = [toolbox.locate(name) for name in names]
    except ToolError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    width = max(len(item.name) for item in located)
    for item in located:
        built = f" (built in {item.build_seconds:.0f} s)" if item.build_seconds is not None else ""
        print(f"{item.name:<{width}}  {item.source:<20} {item.path}{built}")
    print(f"Tools ready in {time.monotonic() - started:.1f} s (cache: {toolbox.cache_dir / 'tools'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
