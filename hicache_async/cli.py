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
        example: dict[str, Any] = {"layout": _EXAMPLE_LAYOUT}
        if "HICACHE_MODEL_NAME" not in os.environ:  # the file L3 needs one
            example["model_name"] = "meta-llama/Meta-Llama-3-8B"
        config = HiCacheConfig(**example)
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

    options = DemoOptions(
        conversations=args.conversations,
        turns=args.turns,
        seed=args.seed,
        model_name=args.model_name,
    )
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


def _replay(args: argparse.Namespace) -> int:
    from pathlib import Path

    import anyio

    from hicache_async.workloads.replay import ReplayOptions, replay

    options = ReplayOptions(
        trace=Path(args.trace),
        page_tokens=args.page_tokens,
        l1_pages=args.l1_pages,
        l2_pages=args.l2_pages,
        l3=args.l3,
        l3_path=Path(args.l3_path) if args.l3_path else None,
        model_name=args.model_name,
        eviction_policy=args.eviction_policy,
        write_policy=args.write_policy,
        prefetch_policy=args.prefetch_policy,
        concurrency=args.concurrency,
        verify=args.verify,
        drain_each=args.drain_each,
        limit=args.limit,
        progress=not args.json and sys.stderr.isatty(),
    )
    outcome = anyio.run(replay, options)
    if args.plot:
        from hicache_async.workloads.replay import plot

        plot(outcome, Path(args.plot))
    result = outcome.as_dict()
    if args.json:
        print(json.dumps(result))
        return 0 if result["verify_failures"] == 0 else 1
    print(f"{result['requests']} requests, {result['pages']} pages, {result['wall_s']:.1f} s")
    print(
        f"hit ratio: {result['hit_ratio_pages']:.4f} of pages, "
        f"{result['hit_ratio_tokens']:.4f} of tokens"
    )
    for tier, hits in result["tiers"].items():
        print(f"  {tier:<8} {hits['hit_pages']:>9} hit pages")
    if args.verify:
        print(f"verify failures: {result['verify_failures']}")
    return 0 if result["verify_failures"] == 0 else 1


def _soak(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hicache_async.testing.soak import BAD_KINDS, FAULT_KINDS, SoakOptions, soak

    faults = FAULT_KINDS if args.faults == "all" else tuple(filter(None, args.faults.split(",")))
    bad = BAD_KINDS if args.bad_kinds == "all" else tuple(filter(None, args.bad_kinds.split(",")))
    try:
        options = SoakOptions(
            seconds=args.seconds,
            seed=args.seed,
            sessions=args.sessions,
            l3=args.l3,
            l3_path=Path(args.l3_path) if args.l3_path else None,
            faults=frozenset(faults),
            bad_kinds=frozenset(bad),
            hang_after_s=args.hang_after,
            device=args.device,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    report = soak(options, backend=args.backend)
    if args.json:
        print(json.dumps(report))
    else:
        keys = ("requests", "ended", "hangs", "wrong_bytes", "leaked_pages", "lost_pages")
        print(", ".join(f"{key} {report[key]}" for key in keys))
        print(f"cache deaths {report['cache_deaths']}, hit ratio {report['hit_ratio']}")
        print(f"faults injected {report['faults_injected']}")
    return 0 if report["ok"] else 1


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
    demo.add_argument(
        "--model-name",
        default="hicache-demo-tiny",
        help="the model's name in the L3 directory's namespace (HiCacheConfig.model_name)",
    )
    demo.add_argument("--json", action="store_true", help="one JSON document on stdout")
    demo.set_defaults(func=_demo)

    rep = commands.add_parser("replay", help="replay a Mooncake-format trace through the cache")
    rep.add_argument("trace", help="JSONL trace (timestamp, input_length, hash_ids)")
    rep.add_argument("--page-tokens", type=int, default=16, help="tokens per page (one hash id)")
    rep.add_argument("--l1-pages", type=int, default=4096)
    rep.add_argument("--l2-pages", type=int, default=0, help="0 = no L2")
    rep.add_argument("--l3", default="none", help="none, file, memory, redis, ...")
    rep.add_argument("--l3-path", help="directory of the file L3")
    rep.add_argument(
        "--model-name",
        default="replay",
        help="namespace of the trace's pages in a shared L3 (HiCacheConfig.model_name): "
        "replays under another name never read these pages",
    )
    rep.add_argument("--eviction-policy", default="lru")
    rep.add_argument("--write-policy", default="write_through")
    rep.add_argument("--prefetch-policy", default="wait_complete")
    rep.add_argument("--concurrency", type=int, default=1)
    rep.add_argument("--verify", action="store_true", help="check every hit byte for byte")
    rep.add_argument(
        "--drain-each",
        action="store_true",
        help="let backups and L3 writes finish after each request (a compute-bound server)",
    )
    rep.add_argument("--limit", type=int, help="replay only the first N lines")
    rep.add_argument("--json", action="store_true", help="one JSON document on stdout")
    rep.add_argument("--plot", metavar="PNG", help="hit ratio per tier over time (matplotlib)")
    rep.set_defaults(func=_replay)

    chaos = commands.add_parser(
        "soak", help="chaos soak: concurrent sessions with faults; checks liveness and bytes"
    )
    chaos.add_argument("--seconds", type=float, default=60.0)
    chaos.add_argument("--seed", type=int, default=0)
    chaos.add_argument("--sessions", type=int, default=64, help="concurrent sessions")
    chaos.add_argument("--l3", default="file", help="file, memory or redis")
    chaos.add_argument("--l3-path", help="directory of the file L3 (default: a temporary one)")
    chaos.add_argument(
        "--faults",
        default="all",
        help="comma-separated fault kinds, 'all' or '' (flaky, slow, corrupt, stall, "
        "copy_fail, copy_slow, cancel, bad)",
    )
    chaos.add_argument(
        "--bad-kinds",
        default="all",
        help="comma-separated bad requests the 'bad' faults mix in, or 'all' (token_id_too_large, "
        "negative_token_id, lone_surrogate_key, too_many_slots, foreign_slots, load_after_exit, "
        "negative_allocate)",
    )
    chaos.add_argument("--hang-after", type=float, default=10.0, help="seconds that make a hang")
    chaos.add_argument("--device", default="cpu", help="L1's device: cpu or cuda")
    chaos.add_argument("--backend", default="asyncio", help="asyncio or trio")
    chaos.add_argument("--json", action="store_true", help="one JSON document on stdout")
    chaos.set_defaults(func=_soak)
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
