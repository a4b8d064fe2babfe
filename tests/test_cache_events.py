"""KV events: emitted after the fact, in order, with the radix hashes, per tier."""

from __future__ import annotations

import json

import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, HiCacheError, KVLayout
from hicache_async.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventStream,
    KVEvent,
    StorageMedium,
)
from hicache_async.radix import page_hashes

from .test_cache_e2e import serve

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", page_size=4)
PROMPT = torch.arange(900, 900 + 6 * 4)  # six pages
G, C, E = StorageMedium.GPU, StorageMedium.CPU_PINNED, StorageMedium.EXTERNAL


def config() -> HiCacheConfig:
    return HiCacheConfig(
        layout=LAYOUT,
        device="cpu",
        device_pages=8,
        host_pages=8,
        storage_backend="memory",
        prefetch_threshold=4,
    )


def pending(stream: EventStream) -> list[KVEvent]:
    return [event for batch in stream.drain_nowait() for event in batch.events]


def summary(events: list[KVEvent]) -> list[tuple[str, StorageMedium | None, int]]:
    out: list[tuple[str, StorageMedium | None, int]] = []
    for e in events:
        if isinstance(e, AllBlocksCleared):
            out.append(("cleared", e.medium, 0))
        else:
            out.append((type(e).__name__, e.medium, len(e.block_hashes)))
    return out


async def test_store_evictions_per_tier_and_clear() -> None:
    hashes = tuple(page_hashes(PROMPT.tolist(), 4))
    async with HiCache.open(config()) as cache, cache.events() as stream:
        await serve(cache, PROMPT)
        await cache.drain()
        stored = pending(stream)
        # L1 at insert, then L2 once the copy landed, then L3 once the backend acknowledged.
        assert summary(stored) == [
            ("BlockStored", G, 6),
            ("BlockStored", C, 6),
            ("BlockStored", E, 6),
        ]
        for event in stored:
            assert isinstance(event, BlockStored)
            assert event.block_hashes == hashes
            assert event.token_ids == tuple(PROMPT.tolist())
            assert event.parent_block_hash is None
            assert event.block_size == 4

        other = torch.arange(50_000, 50_000 + 5 * 4)  # five pages: L1 (8) must evict three
        await serve(cache, other)
        await cache.drain()
        events = pending(stream)
        removed = [e for e in events if isinstance(e, BlockRemoved)]
        # L1 demotes the prompt's three tail pages (leaves first) to L2; then L2, full with
        # 6 + 5 pages of 8, evicts those same host-only pages to make room for the backup.
        assert [e.medium for e in removed] == [G, C]
        assert all(e.block_hashes == hashes[-3:] for e in removed)
        kinds = [(type(e).__name__, e.medium) for e in events]
        assert kinds.index(("BlockRemoved", G)) < kinds.index(("BlockStored", C))

        await cache.clear(storage=True)
        cleared = pending(stream)
        assert summary(cleared) == [("cleared", None, 0)]  # every tier: one clear-all
        assert cache.match_prefix(cache.key(PROMPT)).device_hit_length == 0
        assert cache.storage is not None
        assert await cache.storage.batch_exists(list(hashes)) == 0


async def test_a_partial_clear_is_per_page_removals_and_l3_keeps_its_pages() -> None:
    # Issue 19: clear(storage=False) sent AllBlocksCleared for L1 and L2, which vLLM's and
    # Dynamo's routers read as clear-all: they dropped L3 pages the cache still had.
    hashes = tuple(page_hashes(PROMPT.tolist(), 4))
    async with HiCache.open(config()) as cache, cache.events() as stream:
        await serve(cache, PROMPT)
        await cache.drain()
        pending(stream)
        await cache.clear()
        events = pending(stream)
        assert not any(isinstance(e, AllBlocksCleared) for e in events)
        removed = {m: set() for m in (G, C, E)}
        for event in events:
            assert isinstance(event, BlockRemoved)
            removed[event.medium] |= set(event.block_hashes)
        assert removed == {G: set(hashes), C: set(hashes), E: set()}
        assert cache.storage is not None
        assert await cache.storage.batch_exists(list(hashes)) == 6


async def test_clear_without_l3_is_one_clear_all() -> None:
    cfg = config().model_copy(update={"storage_backend": "none"})
    async with HiCache.open(cfg) as cache, cache.events() as stream:
        await serve(cache, PROMPT)
        await cache.drain()
        pending(stream)
        await cache.clear()
        assert summary(pending(stream)) == [("cleared", None, 0)]


async def test_clear_refuses_while_a_request_holds_pages() -> None:
    async with HiCache.open(config()) as cache:
        await serve(cache, PROMPT)
        async with cache.session(PROMPT):
            with pytest.raises(HiCacheError, match="let them finish first"):
                await cache.clear()


async def test_no_listener_no_hashing() -> None:
    async with HiCache.open(config()) as cache:
        await serve(cache, PROMPT)
        await cache.drain()
        # Hashes were needed for the L3 keys, but no event was built or published.
        assert cache.hub.published == 0


@pytest.mark.parametrize("backend", ["memory", "file"])
async def test_l3_capacity_removals_are_events(backend: str, tmp_path: object) -> None:
    page_bytes = LAYOUT.bytes_per_page + 64  # payload and the codec's trailer
    options = {"capacity_bytes": 4 * page_bytes}
    if backend == "file":
        options["path"] = str(tmp_path)
    config = HiCacheConfig(
        layout=LAYOUT,
        model_name="test-model",
        device="cpu",
        device_pages=8,
        host_pages=8,
        storage_backend=backend,
        storage_backend_extra_config=json.dumps(options),
        prefetch_threshold=4,
    )
    medium = StorageMedium.DISK if backend == "file" else E
    async with HiCache.open(config) as cache, cache.events() as stream:
        await serve(cache, PROMPT)  # six pages into an L3 that holds four
        await cache.drain()
        events = pending(stream)
    removed = [e for e in events if isinstance(e, BlockRemoved) and e.medium is medium]
    assert sum(len(e.block_hashes) for e in removed) == 2
    hashes = page_hashes(PROMPT.tolist(), 4)
    assert set(removed[0].block_hashes) <= set(hashes)  # the pages' own hashes, no suffix
