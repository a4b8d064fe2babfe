"""The router example against real caches: after a workload, its per-medium index of each cache
equals what the cache really holds, including batches it missed and got back by replay."""

from __future__ import annotations

import random
import uuid

import anyio
import torch
import zmq

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.events import hash_to_int64
from hicache_async.radix import RadixTree
from tests.test_cache_e2e import serve

from .conftest import load_example

router = load_example("kv_router")
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float16", page_size=4)


def config(name: str) -> HiCacheConfig:
    return HiCacheConfig(
        layout=LAYOUT,
        device="cpu",
        device_pages=24,
        host_pages=48,
        storage_backend="memory",
        storage_backend_extra_config=f'{{"store": "router-{name}-{uuid.uuid4().hex}"}}',
        prefetch_threshold=4,
        kv_events={"endpoint": "tcp://127.0.0.1:*", "replay_endpoint": "tcp://127.0.0.1:*"},
    )


def truth(cache: HiCache) -> dict[str, set[int]]:
    """What the cache really holds, per medium, as the wire's int64 block hashes."""
    tree: RadixTree = cache.tree
    held: dict[str, set[int]] = {"GPU": set(), "CPU": set(), "STORAGE": set()}  # vLLM's names
    stack = [child for root in [tree.root] for child in root.children.values()]
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        hashes = {hash_to_int64(h) for h in tree.page_hashes(node)}
        if node.state.device_valid:
            held["GPU"] |= hashes
        if node.state.host_valid:
            held["CPU"] |= hashes
    storage = cache.storage
    assert storage is not None
    suffix = len(storage.suffix)
    held["STORAGE"] = {hash_to_int64(k[:-suffix]) for k in storage.store._values}  # type: ignore[attr-defined]
    return held


async def workload(cache: HiCache, rng: random.Random, n: int) -> None:
    for _ in range(n):
        system = rng.randrange(3)
        tokens = torch.cat(
            [
                torch.arange(system * 100, system * 100 + 16),
                torch.tensor([rng.randrange(1000, 9000) for _ in range(rng.randrange(4, 30))]),
            ]
        )
        await serve(cache, tokens)
    await cache.drain()


async def test_router_index_matches_the_caches() -> None:
    rng = random.Random(3)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with HiCache.open(config("a")) as a, HiCache.open(config("b")) as b:
            # Cache b serves before the router listens: those batches come back by replay.
            await workload(b, rng, 5)
            workers = {}
            for name, cache in (("a", a), ("b", b)):
                pub = cache.publisher
                assert pub is not None
                workers[name] = router.Worker(name, pub.endpoint, pub.replay_endpoint)
            index = router.PrefixIndex(list(workers.values()), page_size=LAYOUT.page_size)
            async with anyio.create_task_group() as tg:
                for worker in workers.values():
                    tg.start_soon(router.follow, index, worker, context)
                await anyio.sleep(0.3)  # subscriptions reach the publishers
                await workload(a, rng, 40)  # enough to evict from L1 and L2 several times
                await workload(b, rng, 40)
                with anyio.fail_after(10):
                    for worker, cache in ((workers["a"], a), (workers["b"], b)):
                        while worker.next_seq < cache.hub.published:  # noqa: ASYNC110 - other tasks
                            await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            assert workers["b"].replays >= 1
            for name, cache in (("a", a), ("b", b)):
                held = truth(cache)
                for medium, hashes in held.items():
                    assert workers[name].blocks[medium] == hashes, (name, medium)
                assert held["GPU"]
                assert held["CPU"]
                assert held["STORAGE"]
    finally:
        context.term()
