"""exists / get latency of the ``file`` backend as the store grows (issue 20: flat up to 1M pages).

For each store size N: fill a fresh directory with N pages (batches of 1024, the tensor API),
close it, open a new instance (so no page's place is remembered: every lookup goes to the
index), then time, one call at a time on the event loop, ``exists`` of one key, ``batch_exists``
of 16 keys, and ``get`` of one page, each for ``--samples`` distinct keys drawn at random among
the stored ones; plus ``exists`` of absent keys. Prints a table (p50 / p99 in microseconds) and,
with ``--json``, writes the figures. The directory is removed afterwards.

    python benchmarks/bench_file_index.py --pages 10000,1000000 --page-bytes 4096 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from hicache_async.storage import HiCacheStorageConfig
from hicache_file import FileOptions, FileStorage

CONFIG = HiCacheStorageConfig(model_name="bench-index")


def _key(i: int) -> str:
    return f"{i:016x}" * 4  # as long as a SHA-256 page hash


async def _fill(root: str, pages: int, page_bytes: int) -> float:
    storage = FileStorage(CONFIG, FileOptions(path=root))
    value = torch.randint(0, 256, (page_bytes,), dtype=torch.uint8)
    start = time.perf_counter()
    async with storage:
        for lo in range(0, pages, 1024):
            keys = [_key(i) for i in range(lo, min(pages, lo + 1024))]
            if not await storage.batch_set(keys, [value] * len(keys)):
                raise RuntimeError("a page was not stored")
    return time.perf_counter() - start


def _quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": round(statistics.median(ordered) * 1e6, 1),
        "p99_us": round(ordered[int(0.99 * (len(ordered) - 1))] * 1e6, 1),
        "mean_us": round(statistics.fmean(ordered) * 1e6, 1),
    }


async def _measure(
    root: str, pages: int, page_bytes: int, samples: int, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    picks = rng.sample(range(pages), min(samples * 3, pages))
    one, many, got = picks[:samples], picks[samples : 2 * samples], picks[2 * samples :]
    absent = [pages + i for i in range(samples)]
    out = torch.empty(page_bytes, dtype=torch.uint8)
    times: dict[str, list[float]] = {
        "exists": [],
        "exists_absent": [],
        "batch_exists_16": [],
        "get": [],
    }
    async with FileStorage(CONFIG, FileOptions(path=root)) as storage:
        await storage.wait_open()
        for i in one:
            t = time.perf_counter()
            ok = await storage.exists(_key(i))
            times["exists"].append(time.perf_counter() - t)
            assert ok
        for i in absent:
            t = time.perf_counter()
            ok = await storage.exists(_key(i))
            times["exists_absent"].append(time.perf_counter() - t)
            assert not ok
        for i in many:
            keys = [_key((i + j) % pages) for j in range(16)]
            t = time.perf_counter()
            n = await storage.batch_exists(keys)
            times["batch_exists_16"].append(time.perf_counter() - t)
            assert n == 16
        for i in got or one:
            t = time.perf_counter()
            page = await storage.get(_key(i), out)
            times["get"].append(time.perf_counter() - t)
            assert page is not None
        figures = storage.get_stats()
    return {
        "pages": pages,
        "indexed_pages": figures.get("indexed_pages"),
        **{f"{name}_{k}": v for name, ts in times.items() for k, v in _quantiles(ts).items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pages", default="10000,1000000", help="store sizes, comma list")
    ap.add_argument("--page-bytes", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "bench-file-index"))
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    rows = []
    for pages in (int(p) for p in args.pages.split(",")):
        shutil.rmtree(args.dir, ignore_errors=True)
        try:
            fill_s = asyncio.run(_fill(args.dir, pages, args.page_bytes))
            row = asyncio.run(_measure(args.dir, pages, args.page_bytes, args.samples, args.seed))
            row["fill_s"] = round(fill_s, 1)
            row["fill_pages_per_s"] = round(pages / fill_s)
            du = sum(e.stat().st_blocks * 512 for e in os.scandir(args.dir) if e.is_file())
            du += sum(
                e.stat().st_blocks * 512 for e in os.scandir(os.path.join(args.dir, "segments"))
            )
            row["disk_MiB"] = round(du / 2**20)
        finally:
            shutil.rmtree(args.dir, ignore_errors=True)
        rows.append(row)
        print(f"# {pages} pages: {row}", file=sys.stderr, flush=True)
    base = rows[0]
    cols = ["exists", "exists_absent", "batch_exists_16", "get"]
    print("| pages | " + " | ".join(f"{c} p50 / p99 us" for c in cols) + " | fill pages/s |")
    print("|---" * (len(cols) + 2) + "|")
    for r in rows:
        cells = []
        for c in cols:
            ratio = r[f"{c}_p50_us"] / base[f"{c}_p50_us"]
            cells.append(f"{r[f'{c}_p50_us']} / {r[f'{c}_p99_us']} ({ratio:.2f}x)")
        print(f"| {r['pages']} | " + " | ".join(cells) + f" | {r['fill_pages_per_s']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "page_bytes": args.page_bytes, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
