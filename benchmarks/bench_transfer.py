"""L1 <-> L2 transfer throughput vs a plain torch copy of the same bytes; loop lag; poller cost.

For each page size and host layout: back up N pages (L1 -> L2) and load them back (L2 -> L1)
through the engine ``make_transfer_engine`` picks, in page order (``runs``: what a fresh
allocator hands out) and in a random page order (``scattered``: after churn), and compare with
one contiguous ``copy_`` of the same byte count in the same run (on CUDA: pinned host memory
and ``copy_(non_blocking=True)``, one way). Then: event-loop lag (a 1 ms ticker's lateness)
during a ~1 GiB backup, and the poller's cost per awaited completion.

    python benchmarks/bench_transfer.py [--device cpu|cuda|auto] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import anyio
import torch

from hicache_async import HostLayout, KVLayout
from hicache_async.memory import DeviceKVPool, HostKVPool, pages_to_slots
from hicache_async.transfer import EventPoller, TransferEngine, make_transfer_engine

MiB = 1 << 20


def llama3_8b(page_size: int) -> KVLayout:
    return KVLayout(
        num_layers=32, num_kv_heads=8, head_dim=128, dtype="bfloat16", page_size=page_size
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainCopy:
    """Contiguous ``copy_`` of the same bytes: host->host on CPU; pinned D2H / H2D on CUDA."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        self.other = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.host.fill_(1)
        self.other.fill_(2)

    def run(self, nbytes: int, direction: str) -> float:
        host, other = self.host[:nbytes], self.other[:nbytes]
        dst, src = (host, other) if direction == "backup" else (other, host)
        sync(self.device)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=self.pinned)
        sync(self.device)
        return time.perf_counter() - start


async def timed(fn: Any) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


async def bench_case(
    poller: EventPoller,
    plain: PlainCopy,
    device: torch.device,
    page_size: int,
    host_layout: HostLayout,
    nbytes: int,
    order: str,
    reps: int,
) -> dict[str, Any]:
    layout = llama3_8b(page_size)
    pages = max(1, nbytes // layout.bytes_per_page)
    dpool = DeviceKVPool(layout, pages, device=device)
    hpool = HostKVPool(layout, pages, host_layout)
    hpool.buffer.zero_()
    engine = make_transfer_engine(dpool, hpool, poller)
    dev_pages, host_pages = dpool.allocator.alloc(pages), hpool.allocator.alloc(pages)
    assert dev_pages is not None
    assert host_pages is not None
    if order == "scattered":
        gen = torch.Generator().manual_seed(0)
        dev_pages = dev_pages[torch.randperm(pages, generator=gen)]
        host_pages = host_pages[torch.randperm(pages, generator=gen)]
    dslots = pages_to_slots(dev_pages, page_size)  # CPU slots: no stream sync to read them
    hslots = pages_to_slots(host_pages, page_size)
    moved = pages * layout.bytes_per_page
    best = {"backup": 1e9, "load": 1e9, "plain_backup": 1e9, "plain_load": 1e9}
    # Interleaved, best of reps (the first round warms up): both sides see the same noise.
    for rep in range(reps + 1):
        times = {
            "plain_backup": plain.run(moved, "backup"),
            "backup": await timed(lambda: engine.backup(dslots, hslots)),
            "plain_load": plain.run(moved, "load"),
            "load": await timed(lambda: engine.load(hslots, dslots)),
        }
        if rep:
            best = {key: min(best[key], times[key]) for key in best}
    gbps = {key: moved / value / 1e9 for key, value in best.items()}
    return {
        "page_size": page_size,
        "host_layout": host_layout.value,
        "order": order,
        "pages": pages,
        "bytes": moved,
        "backup_gbps": gbps["backup"],
        "load_gbps": gbps["load"],
        "plain_backup_gbps": gbps["plain_backup"],
        "plain_load_gbps": gbps["plain_load"],
        "backup_ratio": gbps["backup"] / gbps["plain_backup"],
        "load_ratio": gbps["load"] / gbps["plain_load"],
    }


async def ticker_lag(work: Any) -> tuple[dict[str, float], float]:
    """A 1 ms ticker's lateness (ms quantiles) while ``work()`` runs; and work's seconds."""
    lags: list[float] = []
    stop = anyio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            await anyio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await anyio.sleep(0.005)
        start = time.perf_counter()
        await work()
        elapsed = time.perf_counter() - start
        stop.set()
    lags.sort()
    q = lambda f: lags[min(len(lags) - 1, int(f * len(lags)))] * 1e3  # noqa: E731
    return {
        "ticks": len(lags),
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "max_ms": lags[-1] * 1e3,
    }, elapsed


async def loop_lag(poller: EventPoller, device: torch.device, nbytes: int) -> dict[str, Any]:
    """Ticker lateness while ``nbytes`` are backed up 3 times (page_first, page size 16),
    next to two baselines in the same run: an idle loop, and a plain contiguous ``copy_`` of
    the same bytes in a worker thread (what any off-loop copy costs the loop on this machine).
    """
    layout = llama3_8b(16)
    pages = max(1, nbytes // layout.bytes_per_page)
    moved = pages * layout.bytes_per_page
    dpool = DeviceKVPool(layout, pages, device=device)
    hpool = HostKVPool(layout, pages, HostLayout.PAGE_FIRST)
    hpool.buffer.zero_()
    engine: TransferEngine = make_transfer_engine(dpool, hpool, poller)
    dslots = pages_to_slots(dpool.allocator.alloc(pages), 16)  # type: ignore[arg-type]
    hslots = pages_to_slots(hpool.allocator.alloc(pages), 16)  # type: ignore[arg-type]
    await engine.backup(dslots, hslots)  # warm up
    plain = PlainCopy(moved, device)

    async def backups() -> None:
        for _ in range(3):
            await engine.backup(dslots, hslots)

    async def plain_copies() -> None:
        for _ in range(3):
            await anyio.to_thread.run_sync(plain.run, moved, "backup")

    idle, _ = await ticker_lag(lambda: anyio.sleep(0.2))
    baseline, _ = await ticker_lag(plain_copies)
    during, elapsed = await ticker_lag(backups)
    return {
        "bytes": moved,
        "backups": 3,
        "backup_gbps": 3 * moved / elapsed / 1e9,
        "lag_p50_ms": during["p50_ms"],
        "lag_p99_ms": during["p99_ms"],
        "lag_max_ms": during["max_ms"],
        "ticks": during["ticks"],
        "idle": idle,
        "plain_copy_in_thread": baseline,
    }


async def poller_overhead(poller: EventPoller, device: torch.device, n: int) -> dict[str, float]:
    """Microseconds the poller adds per awaited completion."""
    out: dict[str, float] = {}
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        x = torch.empty(1 << 20, device=device)
        event = torch.cuda.Event()

        async def with_poller() -> None:
            with torch.cuda.stream(stream):
                x.add_(1)
                event.record(stream)
            await poller.wait(event)

        async def with_sync() -> None:
            with torch.cuda.stream(stream):
                x.add_(1)
                event.record(stream)
            event.synchronize()  # the blocking baseline, for the measurement only

        base = await per_call(with_sync, n)
        polled = await per_call(with_poller, n)
        out.update(cuda_event_sync_us=base, cuda_event_poller_us=polled, overhead_us=polled - base)
    else:
        # Completions 50 us away (inside the spin window) and 2 ms away (past it: timers).
        for label, delay, count in (("", 50e-6, n), ("_2ms", 2e-3, max(20, n // 20))):
            latencies = []
            for _ in range(count):
                at = time.perf_counter() + delay
                await poller.wait(lambda at=at: time.perf_counter() >= at)
                latencies.append(time.perf_counter() - at)
            latencies.sort()
            out[f"detect{label}_p50_us"] = latencies[len(latencies) // 2] * 1e6
            out[f"detect{label}_p99_us"] = latencies[int(0.99 * len(latencies))] * 1e6
            out[f"detect{label}_mean_us"] = statistics.mean(latencies) * 1e6
        out["overhead_us"] = out["detect_mean_us"]
    concurrent = 1000
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        at = time.perf_counter() + 0.002
        for _ in range(concurrent):
            tg.start_soon(poller.wait, lambda: time.perf_counter() >= at)
    out["concurrent_1000_total_ms"] = (time.perf_counter() - start) * 1e3
    return out


async def per_call(fn: Any, n: int) -> float:
    await fn()
    start = time.perf_counter()
    for _ in range(n):
        await fn()
    return (time.perf_counter() - start) / n * 1e6


async def main(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    nbytes = (64 if args.quick else args.mib) * MiB
    reps = 2 if args.quick else 5
    orders = ["runs"] if args.quick else ["runs", "scattered"]
    results: dict[str, Any] = {
        "device": str(device),
        "machine": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(["python benchmarks/bench_transfer.py", *sys.argv[1:]]),
    }
    plain = PlainCopy(nbytes, device)
    cases = []
    async with EventPoller.open() as poller:
        for page_size in (16, 64):
            for host_layout in HostLayout:
                for order in orders:
                    row = await bench_case(
                        poller, plain, device, page_size, host_layout, nbytes, order, reps
                    )
                    cases.append(row)
                    if not args.json:
                        print(fmt_row(row), flush=True)
        results["cases"] = cases
        results["loop_lag"] = await loop_lag(poller, device, (128 if args.quick else 1024) * MiB)
        results["poller"] = await poller_overhead(poller, device, 200 if args.quick else 2000)
    return results


def fmt_row(row: dict[str, Any]) -> str:
    return (
        f"page={row['page_size']:>3} {row['host_layout']:<18} {row['order']:<9} "
        f"backup {row['backup_gbps']:6.2f} GB/s ({row['backup_ratio']:.2f}x of "
        f"{row['plain_backup_gbps']:.2f})  load {row['load_gbps']:6.2f} GB/s "
        f"({row['load_ratio']:.2f}x of {row['plain_load_gbps']:.2f})"
    )


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    parser.add_argument("--quick", action="store_true", help="64 MiB cases, fewer repeats")
    parser.add_argument("--mib", type=int, default=512, help="bytes moved per case, in MiB")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args()
    results = anyio.run(main, args)
    if args.json:
        json.dump(results, sys.stdout, indent=2)
        print()
    else:
        print(f"loop lag: {results['loop_lag']}")
        print(f"poller: {results['poller']}")


if __name__ == "__main__":
    cli()
