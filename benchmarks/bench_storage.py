"""L3 storage throughput against raw system calls on the same pages, in the same run.

File backend, per page size: write (``batch_set_v1``), hot read (page cache warm) and cold read
(after ``sync`` + ``echo 3 > /proc/sys/vm/drop_caches``, as root where allowed), each next to raw
``open``/``os.pwrite``/``close`` and ``open``/``os.preadv``/``close`` of the same page bytes, one
file a page, in one thread. The event loop's lag (a 1 ms sleeper's overshoot) is sampled while
the backend runs. Redis: ``batch_set_v1``/``batch_get_v1`` against raw pipelined SET/GET of the
same values from the same ``redis.asyncio`` client. Mooncake (``--backends mooncake``; a master and
a store node on loopback): ``batch_set_v1``/``batch_get_v1`` against the bare client's
``batch_put_from``/``batch_get_into`` of the same registered pool pages.

    python benchmarks/bench_storage.py --json                      # 512 MiB a phase
    python benchmarks/bench_storage.py --total-mib 128 --repeats 1 # quick

MB/s are decimal (1e6 bytes/s). Ratios are ours / raw, medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hicache_async.config import HostLayout
from hicache_async.layout import KVLayout
from hicache_async.memory import HostKVPool, pages_to_slots
from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig, create_storage

TOKEN_BYTES = 128 << 10  # Llama-3-8B-like: 32 layers x 8 KV heads x 128 dim x K,V x bf16


def layout_for(page_bytes: int) -> KVLayout:
    """A Llama-3-8B-like layout whose pages are ``page_bytes`` long."""
    tokens = max(1, page_bytes // TOKEN_BYTES)
    return KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, page_size=tokens, dtype="bf16")


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache; False where not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def prefault(nbytes: int) -> None:
    """Touch and free ``nbytes`` of memory before a phase that fills the page cache.

    On these Firecracker VMs, guest pages left free for a few seconds go back to the host, and
    their next first touch costs a host fault (~0.5 GB/s instead of ~7 GB/s; see
    ``../shared/peers/benchlib.py``). Touching a buffer first leaves host-backed pages at the
    head of the free lists, so the timed page-cache fills run at memory speed, for raw and for
    the backend alike.
    """
    buf = np.empty(nbytes, dtype=np.uint8)
    buf.fill(1)  # every page written, so every page is backed
    del buf


class LagProbe:
    """Samples how late a 1 ms sleep wakes up, while it runs."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            self.samples.append(time.perf_counter() - start - 0.001)

    def __enter__(self) -> LagProbe:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def p99_ms(self) -> float:
        if not self.samples:
            return 0.0
        ordered = sorted(self.samples)
        return 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def same_bytes(a: HostKVPool, b: HostKVPool) -> bool:
    # Compare bytes, not floats: random bf16 bytes include NaNs, which never compare equal.
    return torch.equal(a.buffer.view(-1).view(torch.uint8), b.buffer.view(-1).view(torch.uint8))


# -- raw baselines (one thread, one file a page) --------------------------------------------


def raw_write(root: str, pool: HostKVPool) -> None:
    for page in range(pool.num_pages):
        (view,) = pool.page_segments(page)
        fd = os.open(f"{root}/{page}.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], done)
        finally:
            os.close(fd)


def raw_read(root: str, pool: HostKVPool) -> None:
    for page in range(pool.num_pages):
        (view,) = pool.page_segments(page)
        fd = os.open(f"{root}/{page}.bin", os.O_RDONLY)
        try:
            if os.preadv(fd, [view], 0) != len(view):
                raise OSError("short read")
        finally:
            os.close(fd)


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def run_file(args: argparse.Namespace, page_bytes: int, base: str) -> dict[str, Any]:
    layout = layout_for(page_bytes)
    n = max(1, (args.total_mib << 20) // layout.bytes_per_page)
    src = HostKVPool(layout, n, HostLayout.PAGE_FIRST, pin_memory=False)
    src.buffer.view(-1).view(torch.uint8).copy_(
        torch.randint(0, 256, (src.nbytes,), dtype=torch.uint8)
    )
    dst = HostKVPool(layout, n, HostLayout.PAGE_FIRST, pin_memory=False)
    dst.buffer.zero_()  # first-touch the destination before any timing
    keys = [f"bench-{page_bytes}-{i}" for i in range(n)]
    per_batch = max(1, (args.batch_mib << 20) // layout.bytes_per_page)
    all_slots = pages_to_slots(torch.arange(n, dtype=torch.int64), layout.page_size)
    raw_dir, store_dir = f"{base}/raw", f"{base}/store"
    total = n * layout.bytes_per_page
    cfg = HiCacheStorageConfig(model_name="bench")
    phases: dict[str, list[float]] = {k: [] for k in (
        "raw_write", "write", "raw_hot", "hot", "raw_cold", "cold")}  # fmt: skip
    lag = LagProbe()
    cold_ok = True

    async def batches(op: Callable[..., Awaitable[list[bool]]]) -> None:
        # --inflight batches at a time, as the runtime overlaps the transfers of requests.
        gate = asyncio.Semaphore(args.inflight)

        async def one(lo: int) -> None:
            hi = min(n, lo + per_batch)
            async with gate:
                ok = await op(keys[lo:hi], all_slots[lo * layout.page_size : hi * layout.page_size])
            if not all(ok):
                raise RuntimeError("a benchmark page failed")

        async with asyncio.TaskGroup() as group:
            for lo in range(0, n, per_batch):
                group.create_task(one(lo))

    async def phase(name: str, fn: Callable[[], Awaitable[Any]]) -> None:
        # The lag probe runs in every phase, raw ones included, so both pay the same loop tax;
        # only the backend's phases count towards the reported lag.
        probe = LagProbe()
        with probe:
            phases[name].append(await timed(fn))
        if not name.startswith("raw"):
            lag.samples.extend(probe.samples)

    for repeat in range(args.repeats):
        for d in (raw_dir, store_dir):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        extra = {"io_threads": args.io_threads} if args.io_threads else {}
        storage: HiCacheStorage = create_storage("file", cfg, path=store_dir, **extra)
        # Alternate which goes first: writeback of the earlier writes slows the later ones.
        raw_first = repeat % 2 == 0
        async with storage:
            storage.register_mem_pool_host(src)
            for which in ["raw", "ours"] if raw_first else ["ours", "raw"]:
                os.sync()
                prefault(total + total // 4)
                if which == "raw":
                    await phase("raw_write", lambda: asyncio.to_thread(raw_write, raw_dir, src))
                else:
                    await phase("write", lambda: batches(storage.batch_set_v1))
            os.sync()
            storage.register_mem_pool_host(dst)
            # Hot: each copy was just written, then is read once before the timed read.
            await asyncio.to_thread(raw_read, raw_dir, dst)
            await batches(storage.batch_get_v1)
            for which in ["raw", "ours"] if raw_first else ["ours", "raw"]:
                if which == "raw":
                    await phase("raw_hot", lambda: asyncio.to_thread(raw_read, raw_dir, dst))
                else:
                    await phase("hot", lambda: batches(storage.batch_get_v1))
            if not same_bytes(src, dst):
                raise RuntimeError("read-back bytes differ")
            if args.no_cold:
                cold_ok = False
                continue
            for which in ["raw", "ours"] if raw_first else ["ours", "raw"]:
                if not drop_caches():
                    cold_ok = False
                    break
                prefault(total + total // 4)
                if which == "raw":
                    await phase("raw_cold", lambda: asyncio.to_thread(raw_read, raw_dir, dst))
                else:
                    await phase("cold", lambda: batches(storage.batch_get_v1))
    shutil.rmtree(raw_dir, ignore_errors=True)
    shutil.rmtree(store_dir, ignore_errors=True)

    def mbps(key: str) -> float | None:
        return round(total / statistics.median(phases[key]) / 1e6, 1) if phases[key] else None

    row: dict[str, Any] = {"backend": "file", "page_bytes": layout.bytes_per_page, "pages": n}
    for ours, raw in (("write", "raw_write"), ("hot", "raw_hot"), ("cold", "raw_cold")):
        a, b = mbps(ours), mbps(raw)
        row[f"{ours}_mbps"], row[f"raw_{ours}_mbps"] = a, b
        row[f"{ours}_x_raw"] = round(a / b, 3) if a and b else None
    row["cold_measured"] = cold_ok
    row["loop_lag_p99_ms"] = round(lag.p99_ms(), 3)
    return row


def server_phase(
    args: argparse.Namespace, page_bytes: int, tag: str
) -> tuple[KVLayout, int, HostKVPool, HostKVPool, list[str], torch.Tensor]:
    """A server backend's phase: ``--redis-total-mib`` of random source pages, an empty
    destination pool of the same shape, their keys and token slots."""
    layout = layout_for(page_bytes)
    n = max(1, (args.redis_total_mib << 20) // layout.bytes_per_page)
    src = HostKVPool(layout, n, HostLayout.PAGE_FIRST, pin_memory=False)
    src.buffer.view(-1).view(torch.uint8).copy_(
        torch.randint(0, 256, (src.nbytes,), dtype=torch.uint8)
    )
    dst = HostKVPool(layout, n, HostLayout.PAGE_FIRST, pin_memory=False)
    dst.buffer.zero_()
    keys = [f"{tag}-{page_bytes}-{i}" for i in range(n)]
    all_slots = pages_to_slots(torch.arange(n, dtype=torch.int64), layout.page_size)
    return layout, n, src, dst, keys, all_slots


async def run_redis(args: argparse.Namespace, page_bytes: int, port: int) -> dict[str, Any]:
    layout, n, src, dst, keys, all_slots = server_phase(args, page_bytes, "rb")
    cfg = HiCacheStorageConfig(model_name="bench")
    times: dict[str, list[float]] = {k: [] for k in ("raw_set", "set", "raw_get", "get")}
    lag = LagProbe()
    for _ in range(args.repeats):
        storage = create_storage("redis", cfg, port=port, batch_keys=args.redis_batch_keys)
        async with storage:
            client = storage.client  # type: ignore[attr-defined]
            await client.flushall()
            values = [bytes(src.page_segments(i)[0]) for i in range(n)]

            async def raw_set() -> None:
                step = args.redis_batch_keys
                for lo in range(0, n, step):
                    pipe = client.pipeline(transaction=False)
                    for i in range(lo, min(n, lo + step)):
                        pipe.set(f"raw:{keys[i]}", values[i])
                    await pipe.execute()

            async def raw_get() -> None:
                step = args.redis_batch_keys
                for lo in range(0, n, step):
                    pipe = client.pipeline(transaction=False)
                    for i in range(lo, min(n, lo + step)):
                        pipe.get(f"raw:{keys[i]}")
                    got = await pipe.execute()
                    for i, value in zip(range(lo, n), got, strict=False):
                        dst.page_segments(i)[0][:] = value  # the raw path lands bytes too

            async def ours(op: Callable[..., Awaitable[list[bool]]]) -> None:
                if not all(await op(keys, all_slots)):
                    raise RuntimeError("a redis benchmark page failed")

            storage.register_mem_pool_host(src)
            times["raw_set"].append(await timed(raw_set))
            with lag:
                times["set"].append(await timed(lambda: ours(storage.batch_set_v1)))
            storage.register_mem_pool_host(dst)
            times["raw_get"].append(await timed(raw_get))
            with lag:
                times["get"].append(await timed(lambda: ours(storage.batch_get_v1)))
            if not same_bytes(src, dst):
                raise RuntimeError("redis read-back bytes differ")
            await client.flushall()
    return ratios_row("redis", layout, n, times, lag)


async def run_mooncake(args: argparse.Namespace, page_bytes: int, store: Any) -> dict[str, Any]:
    """Our backend against the bare Mooncake client moving the same registered pool pages
    (``batch_put_from`` / ``batch_get_into``, ``batch_keys`` a call, in a worker thread)."""
    layout, n, src, dst, keys, all_slots = server_phase(args, page_bytes, "mb")
    cfg = HiCacheStorageConfig(model_name="bench")
    times: dict[str, list[float]] = {k: [] for k in ("raw_set", "set", "raw_get", "get")}
    lag = LagProbe()
    step = args.mooncake_batch_keys
    size = layout.bytes_per_page
    for _ in range(args.repeats):
        storage = create_storage("mooncake", cfg, **store.options(prefix="bench:", batch_keys=step))
        async with storage:
            storage.register_mem_pool_host(src)
            await storage.clear()  # connects and registers src
            client = storage._store  # type: ignore[attr-defined]
            client.register_buffer(dst.buffer.data_ptr(), dst.nbytes)  # src: by the backend

            def raw(op: str, pool: HostKVPool, prefix: str = "raw:") -> None:
                base = pool.buffer.data_ptr()
                for lo in range(0, n, step):
                    part = range(lo, min(n, lo + step))
                    names = [f"{prefix}{keys[i]}" for i in part]
                    ptrs = [base + i * size for i in part]
                    codes = getattr(client, op)(names, ptrs, [size] * len(names))
                    if any(c < 0 for c in codes):
                        raise RuntimeError(f"raw mooncake {op} failed: {codes}")

            async def ours(op: Callable[..., Awaitable[list[bool]]]) -> None:
                if not all(await op(keys, all_slots)):
                    raise RuntimeError("a mooncake benchmark page failed")

            # Touch the store node's memory first, so neither side pays its first-touch faults.
            await asyncio.to_thread(raw, "batch_put_from", src, "warm:")
            await asyncio.to_thread(client.remove_by_regex, "^warm:", True)
            times["raw_set"].append(
                await timed(lambda: asyncio.to_thread(raw, "batch_put_from", src))
            )
            with lag:
                times["set"].append(await timed(lambda: ours(storage.batch_set_v1)))
            times["raw_get"].append(
                await timed(lambda: asyncio.to_thread(raw, "batch_get_into", dst))
            )
            if not same_bytes(src, dst):
                raise RuntimeError("raw mooncake read-back bytes differ")
            dst.buffer.zero_()
            client.unregister_buffer(dst.buffer.data_ptr())  # the backend registers it itself
            storage.register_mem_pool_host(dst)
            with lag:
                times["get"].append(await timed(lambda: ours(storage.batch_get_v1)))
            if not same_bytes(src, dst):
                raise RuntimeError("mooncake read-back bytes differ")
            await storage.clear()
            client.remove_by_regex("^raw:", True)
    return ratios_row("mooncake", layout, n, times, lag)


def ratios_row(
    backend: str, layout: KVLayout, n: int, times: dict[str, list[float]], lag: LagProbe
) -> dict[str, Any]:
    """MB/s of our set/get and of the raw client's, and their ratios."""
    total = n * layout.bytes_per_page
    row: dict[str, Any] = {"backend": backend, "page_bytes": layout.bytes_per_page, "pages": n}
    for ours_key, raw_key in (("set", "raw_set"), ("get", "raw_get")):
        a = total / statistics.median(times[ours_key]) / 1e6
        b = total / statistics.median(times[raw_key]) / 1e6
        row[f"{ours_key}_mbps"], row[f"raw_{ours_key}_mbps"] = round(a, 1), round(b, 1)
        row[f"{ours_key}_x_raw"] = round(a / b, 3)
    row["loop_lag_p99_ms"] = round(lag.p99_ms(), 3)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    files = [r for r in rows if r["backend"] == "file"]
    if files:
        lines += [
            "| page | pages | write MB/s | raw | x raw | hot read MB/s | raw | x raw "
            "| cold read MB/s | raw | x raw | loop lag p99 ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in files:
            lines.append(
                f"| {r['page_bytes'] >> 10} KiB | {r['pages']} | {r['write_mbps']} | "
                f"{r['raw_write_mbps']} | {r['write_x_raw']} | {r['hot_mbps']} | "
                f"{r['raw_hot_mbps']} | {r['hot_x_raw']} | {r['cold_mbps']} | "
                f"{r['raw_cold_mbps']} | {r['cold_x_raw']} | {r['loop_lag_p99_ms']} |"
            )
    for r in rows:
        if r["backend"] == "idle":
            lines.append(f"\nIdle event loop, same probe: lag p99 {r['loop_lag_p99_ms']} ms.")
    for backend, raw_set, raw_get in (
        ("redis", "raw SET", "raw GET"),
        ("mooncake", "raw put_from", "raw get_into"),
    ):
        picked = [r for r in rows if r["backend"] == backend]
        if not picked:
            continue
        lines += [
            "",
            f"| {backend} page | pages | set MB/s | {raw_set} | x raw | get MB/s | {raw_get} "
            "| x raw | loop lag p99 ms |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in picked:
            lines.append(
                f"| {r['page_bytes'] >> 10} KiB | {r['pages']} | {r['set_mbps']} | "
                f"{r['raw_set_mbps']} | {r['set_x_raw']} | {r['get_mbps']} | "
                f"{r['raw_get_mbps']} | {r['get_x_raw']} | {r['loop_lag_p99_ms']} |"
            )
    return "\n".join(lines)


async def idle_lag_p99_ms(seconds: float = 1.0) -> float:
    """The lag p99 of an idle loop: this machine's floor for the figures above."""
    probe = LagProbe()
    with probe:
        await asyncio.sleep(seconds)
    return round(probe.p99_ms(), 3)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [{"backend": "idle", "loop_lag_p99_ms": await idle_lag_p99_ms()}]
    sizes = [int(s) << 10 for s in args.page_kib.split(",")]
    if "file" in args.backends:
        base = tempfile.mkdtemp(prefix="hicache-bench-", dir=args.dir)
        try:
            for size in sizes:
                rows.append(await run_file(args, size, base))
                print(f"file {size >> 10} KiB done", file=sys.stderr)
        finally:
            shutil.rmtree(base, ignore_errors=True)
    if "redis" in args.backends:
        from hicache_async.testing.redis_server import RedisProcess

        with tempfile.TemporaryDirectory(prefix="hicache-bench-redis-") as tmp:
            server = RedisProcess(Path(tmp))
            server.start()
            try:
                for size in sizes:
                    rows.append(await run_redis(args, size, server.port))
                    print(f"redis {size >> 10} KiB done", file=sys.stderr)
            finally:
                server.stop()
    if "mooncake" in args.backends:
        from hicache_async.testing.mooncake_server import MooncakeStore

        with tempfile.TemporaryDirectory(prefix="hicache-bench-mooncake-") as tmp:
            # Room for the raw and our copies of the biggest phase, with headroom.
            store = MooncakeStore(Path(tmp), segment_bytes=(4 * args.redis_total_mib + 256) << 20)
            store.start()
            try:
                for size in sizes:
                    rows.append(await run_mooncake(args, size, store))
                    print(f"mooncake {size >> 10} KiB done", file=sys.stderr)
            finally:
                store.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--page-kib", default="256,2048,8192", help="page sizes in KiB")
    parser.add_argument("--total-mib", type=int, default=512, help="bytes a file phase moves")
    parser.add_argument(
        "--redis-total-mib", type=int, default=128, help="bytes a redis or mooncake phase moves"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-mib", type=int, default=64, help="bytes per batch_*_v1 call")
    parser.add_argument("--inflight", type=int, default=1, help="batch calls at a time")
    parser.add_argument("--io-threads", type=int, default=None, help="default: the backend's")
    parser.add_argument("--redis-batch-keys", type=int, default=64)
    parser.add_argument("--mooncake-batch-keys", type=int, default=128)
    parser.add_argument("--backends", default="file,redis")
    parser.add_argument("--dir", default=None, help="where the files go (a disk, not tmpfs)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-read phase")
    args = parser.parse_args()
    rows = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps({"rows": rows, "args": vars(args)}, indent=2))
    else:
        print(table(rows))


if __name__ == "__main__":
    main()
