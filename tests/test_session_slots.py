"""Who owns which L1 page after a commit: the tree takes whole pages, the session frees the rest."""

from __future__ import annotations

import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.radix import Tier as RadixTier

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float16", page_size=4)


def config() -> HiCacheConfig:
    return HiCacheConfig(
        layout=LAYOUT, device="cpu", device_pages=64, host_pages=128, storage_backend="none"
    )


async def assert_pages_accounted(cache: HiCache) -> None:
    await cache.drain()  # backups in flight pin their nodes
    tree = cache.tree
    assert tree.protected_size(RadixTier.DEVICE) == 0
    assert cache.l1.allocator.used == tree.total_size(RadixTier.DEVICE) // cache.page_size
    tree.check()


async def test_partial_last_page_is_freed_and_whole_pages_kept() -> None:
    async with HiCache.open(config()) as cache:
        tokens = torch.arange(10)  # two whole pages and two tokens
        async with cache.session(tokens) as s:
            hit = await s.load()
            await s.commit(await s.allocate(tokens.numel() - hit.length))
        await assert_pages_accounted(cache)
        assert cache.tree.total_size(RadixTier.DEVICE) == 8
        async with cache.session(torch.arange(12)) as s:  # a hit on the first two pages
            hit = await s.load()
            assert hit.length == 8
            await s.commit(await s.allocate(4))
        await assert_pages_accounted(cache)


async def test_two_allocations_committed_together() -> None:
    async with HiCache.open(config()) as cache:
        tokens = torch.arange(100, 114)
        async with cache.session(tokens) as s:
            await s.load()
            first, second = await s.allocate(8), await s.allocate(6)
            await s.commit(torch.cat([first, second]))
        await assert_pages_accounted(cache)
        assert cache.tree.total_size(RadixTier.DEVICE) == 12


async def test_slots_another_request_cached_first_are_freed() -> None:
    async with HiCache.open(config()) as cache:
        tokens = torch.arange(200, 216)
        a, b = cache.session(tokens), cache.session(tokens)
        async with a, b:
            slots_a = await a.allocate(16 - (await a.load()).length)
            slots_b = await b.allocate(16 - (await b.load()).length)
            assert await a.commit(slots_a) == 0
            assert await b.commit(slots_b) == 16  # all duplicates: b's pages go back
        await assert_pages_accounted(cache)
        assert cache.l1.allocator.used == 4


async def test_uncommitted_allocation_is_freed_on_exit() -> None:
    async with HiCache.open(config()) as cache:
        async with cache.session(torch.arange(300, 320)) as s:
            await s.load()
            await s.allocate(20)
        await assert_pages_accounted(cache)
        assert cache.l1.allocator.used == 0


async def test_usual_commit_hands_the_tree_page_tables(monkeypatch) -> None:
    # An L1 hit plus one allocate(): the session inserts the page tables it holds (no slot
    # conversion); its pages and the tree's slots agree with what the model was handed.
    async with HiCache.open(config()) as cache:
        calls: list[str] = []
        for name in ("insert", "insert_pages"):
            original = getattr(cache.tree, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(cache.tree, name, spy)
        handed = []
        for tokens in (torch.arange(10), torch.arange(14), torch.arange(14)):
            async with cache.session(tokens) as s:
                hit = await s.load()
                new = await s.allocate(tokens.numel() - hit.length)
                handed.append((hit.device_indices, new))
                await s.commit(new)
            await assert_pages_accounted(cache)
        assert calls == ["insert_pages", "insert_pages"]  # the third request is a full hit
        match = cache.tree.match_prefix(cache.key(torch.arange(14)))
        assert torch.equal(match.device_indices, torch.cat([*handed[1]])[:12])
