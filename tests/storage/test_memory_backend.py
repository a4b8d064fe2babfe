"""Memory backend specifics: capacity, corrupt values, shared named stores."""

from __future__ import annotations

from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.storage import MHA, filled_pool, page_bytes, slots
from hicache_memory import MemoryStorage, drop_named_store


def _open(**options: object) -> MemoryStorage:
    storage = create_storage("memory", HiCacheStorageConfig(model_name="m"), **options)
    assert isinstance(storage, MemoryStorage)
    return storage


async def test_capacity_drops_least_recently_used() -> None:
    value = MHA.bytes_per_page + 64
    async with _open(capacity_bytes=3 * value) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        await storage.batch_set_v1(["a", "b", "c"], slots(pool, [0, 1, 2]))
        assert await storage.batch_get_v1(["a"], slots(pool, [7])) == [True]
        await storage.batch_set_v1(["d"], slots(pool, [3]))
        assert [await storage.exists(k) for k in "abcd"] == [True, False, True, True]
        assert storage.get_stats()["used_bytes"] == 3 * value


async def test_page_larger_than_capacity_is_a_failed_set() -> None:
    async with _open(capacity_bytes=100) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [False]
        assert storage.get_stats()["set_failed"] == 1


async def test_corrupt_value_is_a_miss_and_dropped() -> None:
    async with _open() as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        await storage.batch_set_v1(["a", "b"], slots(pool, [0, 1]))
        key = "a" + storage.suffix
        raw = bytearray(storage.store.raw(key) or b"")
        raw[5] ^= 0x10
        storage.store.replace_raw(key, bytes(raw))
        before = page_bytes(pool, 6)
        assert await storage.batch_get_v1(["a", "b"], slots(pool, [6, 7])) == [False, True]
        assert page_bytes(pool, 6) == before  # checked before copying: the page is untouched
        assert storage.get_stats()["errors"] == {"corrupt": 1}
        assert not await storage.exists("a")
        storage.store.replace_raw("b" + storage.suffix, b"short")
        assert await storage.batch_get_v1(["b"], slots(pool, [6])) == [False]


async def test_named_store_is_shared() -> None:
    try:
        async with _open(store="shared-x") as one, _open(store="shared-x") as two:
            assert one.store is two.store
    finally:
        drop_named_store("shared-x")
