"""The cost of going beyond one process: TP consensus rounds, and KV event publishing.

* ``consensus``: two real gloo ranks (spawned processes) run MIN all-reduce rounds through
  ``RankConsensus``, awaited by polling; a prefetch makes two rounds (pages found, pages
  arrived), so its added latency is twice a round's.
* ``events``: a cache-sized stream of ``BlockStored`` batches (16 pages each) through the ZMQ
  publisher to a real SUB socket on loopback; events/s, and the lateness of a 1 ms ticker on
  the publishing loop meanwhile.

    python benchmarks/bench_distributed.py [--rounds 2000] [--batches 20000] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from typing import Any

import anyio
import anyio.lowlevel
import torch.distributed as dist
import zmq

from hicache_async.config import KVEventsConfig
from hicache_async.events import BlockStored, EventHub, StorageMedium
from hicache_async.kv_publisher import ZmqEventPublisher
from hicache_async.tiers.consensus import RankConsensus
from hicache_async.transfer import EventPoller


async def _rounds(rank: int, rounds: int) -> dict[str, float]:
    out: dict[str, float] = {}
    async with EventPoller.open() as poller:

        async def in_thread(work: dist.Work) -> None:
            await anyio.to_thread.run_sync(work.wait)

        for name, waiter in (("poller", poller.wait), ("own_loop", None), ("thread", in_thread)):
            consensus = RankConsensus(waiter=waiter) if waiter is not None else RankConsensus()
            times = []
            for i in range(rounds):
                start = time.perf_counter()
                await consensus.agree(rank + i)
                times.append(time.perf_counter() - start)
            times.sort()
            out[f"{name}_p50_us"] = times[len(times) // 2] * 1e6
            out[f"{name}_p99_us"] = times[int(len(times) * 0.99)] * 1e6
    return out


def _rank(rank: int, store: str, rounds: int, results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results.put((rank, anyio.run(_rounds, rank, rounds)))
    finally:
        dist.destroy_process_group()


def consensus(rounds: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_rank, args=(r, f"{tmp}/store", rounds, results)) for r in range(2)
        ]
        for proc in procs:
            proc.start()
        got = dict(results.get(timeout=300) for _ in procs)
        for proc in procs:
            proc.join()
    rank0 = got[0]
    return {
        "rounds": rounds,
        "round_us": rank0,
        "added_latency_per_prefetch_us": 2 * rank0["poller_p50_us"],
    }


async def events(batches: int) -> dict[str, Any]:
    hub = EventHub()
    event = BlockStored(
        tuple(f"{i:064x}" for i in range(16)), None, tuple(range(16 * 16)), 16, StorageMedium.GPU
    )
    lateness: list[float] = []
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    config = KVEventsConfig(endpoint="tcp://127.0.0.1:*", buffer_steps=batches, hwm=0)
    received = 0
    try:
        async with ZmqEventPublisher.open(config, hub) as publisher:
            sub.connect(publisher.endpoint)
            await anyio.sleep(0.3)

            async def ticker() -> None:
                while True:
                    start = time.perf_counter()
                    await anyio.sleep(0.001)
                    lateness.append(time.perf_counter() - start - 0.001)

            async def drain() -> None:
                nonlocal received
                while received < batches:
                    try:
                        sub.recv_multipart(zmq.NOBLOCK)
                        received += 1
                    except zmq.Again:
                        await anyio.sleep(0.0005)

            start = time.perf_counter()
            async with anyio.create_task_group() as tg:
                tg.start_soon(ticker)
                tg.start_soon(drain)
                for i in range(batches):
                    hub.emit([event])
                    if i % 64 == 0:
                        await anyio.lowlevel.checkpoint()  # a cache emits between other work
                with anyio.fail_after(120):
                    while received < batches:  # noqa: ASYNC110 - the drain is another task
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            elapsed = time.perf_counter() - start
    finally:
        sub.close()
        context.term()
    lateness.sort()
    return {
        "batches": batches,
        "events_per_s": batches / elapsed,
        "pages_per_s": 16 * batches / elapsed,
        "loop_lag_ms": {
            "p50": statistics.median(lateness) * 1e3,
            "p99": lateness[int(len(lateness) * 0.99)] * 1e3,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=20000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = {"consensus": consensus(args.rounds), "events": anyio.run(events, args.batches)}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    c, e = result["consensus"], result["events"]
    print(
        f"consensus round p50 {c['round_us']['poller_p50_us']:.0f} us (poller), "
        f"{c['round_us']['own_loop_p50_us']:.0f} us (own loop); "
        f"+{c['added_latency_per_prefetch_us']:.0f} us per prefetch"
    )
    print(
        f"events: {e['events_per_s']:.0f} batches/s ({e['pages_per_s']:.0f} pages/s), "
        f"loop lag p50 {e['loop_lag_ms']['p50']:.2f} ms p99 {e['loop_lag_ms']['p99']:.2f} ms"
    )


if __name__ == "__main__":
    main()
