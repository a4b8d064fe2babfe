"""KV events at the publisher's limit, and what a replay storm costs the requests (issue 19).

* ``limit``: the loop emits ``BlockStored`` batches (16 pages each) as fast as it can for
  ``--seconds`` (yielding every 64 batches, as a busy cache emits between other work), to a ZMQ
  publisher read by a SUB socket in another process. Reported: batches made, numbered on the
  wire, received, the gaps the subscriber saw, drops the cache counted, and *silent* losses:
  batches that never got a sequence number, so no subscriber can notice them.
* ``storm``: a cache on CPU serves requests (``--concurrency`` at a time; shared prefixes, so it
  inserts, evicts, backs up to L2 and writes L3 and emits events all along) for ``--seconds``,
  its replay buffer full (``buffer_steps`` batches). First alone, then while ``--clients``
  DEALER clients in another process each ask for the whole buffer every ``--period`` seconds.
  Reported per run: requests served, and the worst request latency in each 2 s window.
* ``idle``: no subscriber, the loop emitting for ``--idle-seconds``: the process's RSS each 10 s.

It uses only what the publisher offered before issue 19 (``ZmqEventPublisher.open``, ``hub``,
``publisher.published``), so it runs on the commit before the change too::

    python benchmarks/bench_events.py --json > after.json
    git worktree add /tmp/ev-before <rev> && (cd /tmp/ev-before && \\
        PYTHONPATH=. python /path/to/benchmarks/bench_events.py --json > before.json)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import time
from typing import Any

import anyio
import anyio.lowlevel
import torch
import zmq

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.config import KVEventsConfig
from hicache_async.events import BlockStored, EventHub, StorageMedium
from hicache_async.kv_publisher import END_SEQ, ZmqEventPublisher

PAGES = 16
EVENT = BlockStored(
    tuple(f"{i:064x}" for i in range(PAGES)), None, tuple(range(PAGES * 16)), 16, StorageMedium.GPU
)


def _subscribe(endpoint: str, report: Any, stop: Any) -> None:
    """Read the live stream until ``stop`` is set and it went quiet; report what came."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(endpoint)
    received, gaps, last = 0, 0, -1
    report.put("ready")
    quiet = 0.0
    while quiet < 1.0 or not stop.is_set():
        if sub.poll(100):
            while True:
                try:
                    seq = int.from_bytes(sub.recv_multipart(zmq.NOBLOCK)[1], "big")
                except zmq.Again:
                    break
                received += 1
                gaps += max(0, seq - last - 1)
                last = seq
            quiet = 0.0
        else:
            quiet += 0.1
    report.put({"received": received, "gaps_seen": gaps, "last_seq": last})
    sub.close()
    context.term()


async def limit(seconds: float) -> dict[str, Any]:
    hub = EventHub()
    config = KVEventsConfig(endpoint="tcp://127.0.0.1:*", hwm=0)
    ctx = mp.get_context("spawn")
    report, stop = ctx.Queue(), ctx.Event()
    async with ZmqEventPublisher.open(config, hub) as publisher:
        reader = ctx.Process(target=_subscribe, args=(publisher.endpoint, report, stop))
        reader.start()
        await anyio.to_thread.run_sync(report.get)
        await anyio.sleep(0.5)  # PUB/SUB: the subscription reaches the publisher
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline:
            for _ in range(64):
                hub.emit([EVENT])
            await anyio.lowlevel.checkpoint()
        emitting = time.perf_counter() - start
        with anyio.move_on_after(60):  # let the publisher send what it has queued
            while publisher.published < hub.published - hub.dropped:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        sending = time.perf_counter() - start
        sent = publisher.published
        # One more batch once the queue is empty: its number shows how many were numbered, so
        # drops at the end of the run count as gaps (a subscriber sees them at the next batch).
        hub.emit([EVENT])
        with anyio.move_on_after(60):
            while publisher.published == sent:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        stop.set()
        seen = await anyio.to_thread.run_sync(report.get)
        await anyio.to_thread.run_sync(reader.join)
    made = hub.published
    numbered = seen["last_seq"] + 1
    return {
        "seconds_emitting": round(emitting, 2),
        "seconds_until_sent": round(sending, 2),
        "batches_made": made,
        "made_per_s": round(made / emitting),
        "published": sent,
        "published_per_s": round(sent / sending),
        "received": seen["received"],
        "gaps_seen_by_subscriber": seen["gaps_seen"],
        "drops_counted": hub.dropped,
        # Lost with no sequence number: no subscriber can ever notice them.
        "silent_losses": made - numbered,
        "unaccounted": made - seen["received"] - hub.dropped,
        "events_per_batch": 1,
        "pages_per_event": PAGES,
    }


def _storm(endpoint: str, clients: int, period: float, report: Any, stop: Any) -> None:
    """``clients`` DEALERs each asking for the whole buffer every ``period`` s until stopped."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dealers = []
    for _ in range(clients):
        dealer = context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        dealers.append(dealer)
    asked = answered = batches = 0
    next_ask = time.monotonic()
    waiting = set()
    while not stop.is_set():
        now = time.monotonic()
        if now >= next_ask:
            for i, dealer in enumerate(dealers):
                if i not in waiting:  # one request in flight per client
                    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
                    waiting.add(i)
                    asked += 1
            next_ask = now + period
        for i, dealer in enumerate(dealers):
            while dealer.poll(0):
                frames = dealer.recv_multipart()
                if frames[-2] == END_SEQ:
                    waiting.discard(i)
                    answered += 1
                else:
                    batches += 1
        time.sleep(0.002)
    report.put({"asked": asked, "answered": answered, "batches_replayed": batches})
    for dealer in dealers:
        dealer.close()
    context.term()


async def serve_for(cache: HiCache, seconds: float, concurrency: int) -> dict[str, Any]:
    rng = random.Random(1)
    page = cache.config.layout.page_size
    prefixes = [torch.arange(p * 10_000, p * 10_000 + 8 * page) for p in range(16)]
    latencies: list[tuple[float, float]] = []  # (when, seconds)
    start = time.perf_counter()
    deadline = start + seconds

    async def one() -> None:
        tail = torch.tensor(
            [rng.randrange(100_000, 900_000) for _ in range(rng.randrange(1, 4) * page)]
        )
        tokens = torch.cat([prefixes[rng.randrange(len(prefixes))], tail])
        t0 = time.perf_counter()
        async with cache.session(tokens) as s:
            await s.prefetch()
            hit = await s.load()
            todo = len(tokens) - hit.length
            if todo:
                await s.commit(await s.allocate(todo))
        latencies.append((t0 - start, time.perf_counter() - t0))

    async def worker() -> None:
        while time.perf_counter() < deadline:
            await one()

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    windows: dict[int, float] = {}
    for when, took in latencies:
        w = int(when // 2)
        windows[w] = max(windows.get(w, 0.0), took)
    ordered = sorted(latencies, key=lambda x: x[1])
    return {
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / seconds),
        "seconds": seconds,
        "p50_ms": round(ordered[len(ordered) // 2][1] * 1e3, 3),
        "p99_ms": round(ordered[int(len(ordered) * 0.99)][1] * 1e3, 3),
        "worst_ms_per_2s": [round(windows[w] * 1e3, 1) for w in sorted(windows)],
    }


async def storm(seconds: float, clients: int, period: float, concurrency: int) -> dict[str, Any]:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", page_size=16)
    buffer_steps = 10_000
    config = HiCacheConfig(
        layout=layout,
        device="cpu",
        device_pages=512,
        host_pages=1024,
        storage_backend="memory",
        prefetch_threshold=16,
        kv_events={
            "endpoint": "tcp://127.0.0.1:*",
            "replay_endpoint": "tcp://127.0.0.1:*",
            "buffer_steps": buffer_steps,
        },
    )
    out: dict[str, Any] = {}
    ctx = mp.get_context("spawn")
    runs = [("warmup", 0), ("alone", 0), ("replay_storm", clients)]
    runs += [("alone_2", 0), ("replay_storm_2", clients)]
    for name, n in runs:
        async with HiCache.open(config) as cache:
            publisher = cache.publisher
            assert publisher is not None
            assert publisher.replay_endpoint is not None
            for _ in range(buffer_steps):  # a full replay buffer
                cache.hub.emit([EVENT])
            with anyio.fail_after(120):
                while publisher.published < buffer_steps:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
            reader = None
            report, stop = ctx.Queue(), ctx.Event()
            if n:
                reader = ctx.Process(
                    target=_storm, args=(publisher.replay_endpoint, n, period, report, stop)
                )
                reader.start()
                await anyio.sleep(1.0)  # the clients are up and asking
            run = await serve_for(cache, 3.0 if name == "warmup" else seconds, concurrency)
            if reader is not None:
                stop.set()
                run["clients"] = await anyio.to_thread.run_sync(report.get)
                await anyio.to_thread.run_sync(reader.join)
            if name != "warmup":
                out[name] = run
    return out


def _rss_mib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() // 2**20


async def idle(seconds: float) -> dict[str, Any]:
    hub = EventHub()
    config = KVEventsConfig(endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
    rss: list[int] = []
    async with ZmqEventPublisher.open(config, hub) as publisher:
        start = time.perf_counter()
        next_sample = start
        while (now := time.perf_counter()) < start + seconds:
            if now >= next_sample:
                rss.append(_rss_mib())
                next_sample += 10
            for _ in range(64):
                hub.emit([EVENT])
            await anyio.sleep(0.001)
        published = publisher.published
    return {
        "seconds": seconds,
        "batches": hub.published,
        "published": published,
        "rss_mib": rss,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "limit" in args.only:
        out["limit"] = await limit(args.seconds)
    if "storm" in args.only:
        out["storm"] = await storm(args.seconds, args.clients, args.period, args.concurrency)
    if "idle" in args.only:
        out["idle"] = await idle(args.idle_seconds)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--idle-seconds", type=float, default=90.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--period", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--only", nargs="+", default=["limit", "storm"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = anyio.run(main, args)
    print(json.dumps(result, indent=None if args.json else 2))
