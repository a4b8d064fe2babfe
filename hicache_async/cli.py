"""The ``hicache-async`` command line."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

import torch

from hicache_async._version import __version__
from hicache_async.config import HiCacheConfig
from hicache_async.errors import ConfigError

# Optional parts: the import name, and what the user gains by installing it.
_OPTIONAL = {
    "uvloop": "a faster event loop",
    "redis": "the redis storage backend",
    "zmq": "the ZMQ KV event publisher",
    "msgpack": "KV event encoding",
    "prometheus_client": "the Prometheus exporter",
    "matplotlib": "replay --plot",
    "trio": "running on trio through anyio",
}

# Shown by `info` when the environment sets no layout (HICACHE_LAYOUT__...).
_EXAMPLE_LAYOUT = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "bfloat16"}


def _info(args: argparse.Namespace) -> int:
    notes = []
    if any(name.upper().startswith("HICACHE_LAYOUT") for name in os.environ):
        config = HiCacheConfig()
    else:
        notes.append("no layout in the environment (HICACHE_LAYOUT__...); showing a Llama-3-8B one")
        config = HiCacheConfig(layout=_EXAMPLE_LAYOUT)
    report: dict[str, Any] = {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": {
            "available": torch.cuda.is_available(),
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        },
        "optional": {name: importlib.util.find_spec(name) is not None for name in _OPTIONAL},
        "config": config.model_dump(mode="json"),
        "derived": {
            "device": str(config.resolve_device()),
            "host_pages": config.resolved_host_pages,
            "bytes_per_token": config.layout.bytes_per_token,
            "bytes_per_page": config.layout.bytes_per_page,
            "device_bytes": config.device_pages * config.layout.bytes_per_page,
            "host_bytes": config.resolved_host_pages * config.layout.bytes_per_page,
        },
        "notes": notes,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"hicache-async {__version__}  (python {report['python']}, torch {torch.__version__})")
    cuda = report["cuda"]
    print(f"cuda: {', '.join(cuda['devices']) if cuda['available'] else 'not available'}")
    print("optional parts:")
    for name, why in _OPTIONAL.items():
        mark = "yes" if report["optional"][name] else "no "
        print(f"  {mark}  {name:<18} {why}")
    print("config:")
    for key, value in report["config"].items():
        print(f"  {key} = {value}")
    print("derived:")
    for key, value in report["derived"].items():
        print(f"  {key} = {value}")
    for note in notes:
        print(f"note: {note}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    import anyio

    from hicache_async.demo.run import DemoOptions, format_report, run_demo

    options = DemoOptions(conversations=args.conversations, turns=args.turns, seed=args.seed)
    if args.dir is not None:
        options.directory = Path(args.dir)
    if args.fresh and options.directory.exists():
        shutil.rmtree(options.directory)
    report = anyio.run(run_demo, options)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report, options.directory))
    return 0 if report.verified == report.requests else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="hicache-async",
        description="An asyncio-native runtime for the hierarchical KV cache of LLM serving.",
    )
    parser.add_argument("--version", action="version", version=f"hicache-async {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="version, resolved config and optional parts")
    info.add_argument("--json", action="store_true", help="one JSON document on stdout")
    info.set_defaults(func=_info)

    demo = commands.add_parser(
        "demo", help="serve multi-turn chats through the cache and check every hit"
    )
    demo.add_argument("--dir", help="L3 directory (default ~/.cache/hicache-async/demo)")
    demo.add_argument("--fresh", action="store_true", help="empty the L3 directory first")
    demo.add_argument("--conversations", type=int, default=24)
    demo.add_argument("--turns", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="one JSON document on stdout")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.func(args)
    except ConfigError as exc:
        print(f"hicache-async: configuration error: {exc}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
