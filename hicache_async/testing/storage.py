"""The storage conformance kit: one pytest suite every :class:`HiCacheStorage` must pass.

A backend's tests subclass :class:`StorageConformance` and provide one fixture,
``storage_factory``: a callable ``factory(config) -> HiCacheStorage``. Every storage a factory
returns within one test must see the same underlying store (same directory, server or shared
store), empty at the start of the test::

    from hicache_async.testing.storage import StorageConformance

    class TestMyBackend(StorageConformance):
        @pytest.fixture
        def storage_factory(self, tmp_path):
            return lambda config: create_storage("mine", config, path=tmp_path)

The tests need ``pytest-asyncio``. They use real :class:`HostKVPool` pages of every host layout,
MHA and MLA.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable

import pytest
import torch

from hicache_async.config import HostLayout
from hicache_async.errors import ClosedError, ConfigError, LayoutError, StorageError
from hicache_async.layout import KVLayout
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.memory.slots import pages_to_slots
from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig
from hicache_async.testing.faults import CorruptingStorage, FlakyStorage, SlowStorage

__all__ = [
    "MHA",
    "MLA",
    "StorageConformance",
    "StorageFactory",
    "filled_pool",
    "page_bytes",
    "slots",
]

StorageFactory = Callable[[HiCacheStorageConfig], HiCacheStorage]

MHA = KVLayout(num_layers=3, num_kv_heads=2, head_dim=16, page_size=4, dtype="bfloat16")
MLA = KVLayout(
    num_layers=3, page_size=4, dtype="bfloat16", use_mla=True, kv_lora_rank=24, qk_rope_head_dim=8
)
LAYOUTS = [HostLayout.LAYER_FIRST, HostLayout.PAGE_FIRST, HostLayout.PAGE_FIRST_DIRECT]


def filled_pool(
    layout: KVLayout, host_layout: HostLayout = HostLayout.PAGE_FIRST, pages: int = 8, seed: int = 0
) -> HostKVPool:
    """A host pool whose bytes are random (every page differs)."""
    pool = HostKVPool(layout, pages, host_layout, pin_memory=False)
    gen = torch.Generator().manual_seed(seed)
    flat = pool.buffer.view(-1).view(torch.uint8)
    flat.copy_(torch.randint(0, 256, flat.shape, dtype=torch.uint8, generator=gen))
    return pool


def slots(pool: HostKVPool, pages: list[int]) -> torch.Tensor:
    """The token slots of ``pages`` (what ``batch_*_v1`` takes)."""
    return pages_to_slots(torch.tensor(pages, dtype=torch.int64), pool.page_size)


def page_bytes(pool: HostKVPool, page: int) -> bytes:
    """``page`` in canonical byte order."""
    return bytes(pool.get_data_page(page).numpy().tobytes())


def _config(
    layout: KVLayout, rank: int = 0, size: int = 1, model: str = "m"
) -> HiCacheStorageConfig:
    return HiCacheStorageConfig(
        tp_rank=rank, tp_size=size, is_mla_model=layout.use_mla, model_name=model
    )


class StorageConformance:
    """The suite. Subclasses provide ``storage_factory``; set ``slow_cancel_pages`` higher for
    backends whose batches finish too fast to be cancelled midway."""

    #: Pages (of 192 KiB) in the batches the cancellation tests interrupt.
    cancel_pages: int = 48

    @pytest.fixture
    def storage_factory(self) -> StorageFactory:
        raise NotImplementedError("a conformance test class provides a storage_factory fixture")

    # -- round trips ----------------------------------------------------------------------

    @pytest.mark.asyncio
    @pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
    @pytest.mark.parametrize("src_layout", LAYOUTS, ids=[x.value for x in LAYOUTS])
    @pytest.mark.parametrize("dst_layout", LAYOUTS, ids=[x.value for x in LAYOUTS])
    async def test_round_trip(
        self,
        storage_factory: StorageFactory,
        layout: KVLayout,
        src_layout: HostLayout,
        dst_layout: HostLayout,
    ) -> None:
        src = filled_pool(layout, src_layout, seed=1)
        dst = filled_pool(layout, dst_layout, seed=2)
        keys = ["a", "b", "c"]
        async with storage_factory(_config(layout)) as writer:
            writer.register_mem_pool_host(src)
            assert await writer.batch_set_v1(keys, slots(src, [1, 4, 6])) == [True] * 3
        async with storage_factory(_config(layout)) as reader:
            reader.register_mem_pool_host(dst)
            assert await reader.batch_get_v1(keys, slots(dst, [7, 0, 3])) == [True] * 3
            assert await reader.batch_get_v1(["zz"], slots(dst, [5])) == [False]
        for s, d in [(1, 7), (4, 0), (6, 3)]:
            assert page_bytes(src, s) == page_bytes(dst, d)

    @pytest.mark.asyncio
    async def test_batch_exists_counts_leading_keys(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        async with storage_factory(_config(MHA)) as storage:
            storage.register_mem_pool_host(pool)
            assert await storage.batch_exists([]) == 0
            assert await storage.batch_exists(["k0"]) == 0
            await storage.batch_set_v1(["k0", "k1", "k3"], slots(pool, [0, 1, 3]))
            assert await storage.batch_exists(["k0", "k1", "k2", "k3"]) == 2
            assert await storage.batch_exists(["k2", "k3"]) == 0
            assert await storage.batch_exists(["k3", "k0", "k1"]) == 3
            assert await storage.exists("k1")
            assert not await storage.exists("k2")
            found = await storage.batch_get_v1(["k0", "k2", "k3"], slots(pool, [4, 5, 6]))
            assert found == [True, False, True]

    # -- namespaces -----------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_mha_ranks_do_not_share_pages(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        async with (
            storage_factory(_config(MHA, 0, 2)) as rank0,
            storage_factory(_config(MHA, 1, 2)) as rank1,
            storage_factory(_config(MHA, 0, 2, model="other")) as other_model,
        ):
            for s in (rank0, rank1, other_model):
                s.register_mem_pool_host(pool)
            assert await rank0.batch_set_v1(["p"], slots(pool, [0])) == [True]
            assert await rank0.batch_exists(["p"]) == 1
            assert await rank1.batch_exists(["p"]) == 0
            assert await other_model.batch_exists(["p"]) == 0
            assert await rank1.batch_get_v1(["p"], slots(pool, [1])) == [False]

    @pytest.mark.asyncio
    async def test_mla_ranks_share_pages(self, storage_factory: StorageFactory) -> None:
        src, dst = filled_pool(MLA, seed=3), filled_pool(MLA, seed=4)
        async with (
            storage_factory(_config(MLA, 0, 2)) as rank0,
            storage_factory(_config(MLA, 1, 2)) as rank1,
        ):
            rank0.register_mem_pool_host(src)
            rank1.register_mem_pool_host(dst)
            assert await rank0.batch_set_v1(["p"], slots(src, [2])) == [True]
            assert await rank1.batch_get_v1(["p"], slots(dst, [5])) == [True]
        assert page_bytes(src, 2) == page_bytes(dst, 5)

    # -- writes ---------------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_existing_keys_are_not_rewritten(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        async with storage_factory(_config(MHA)) as storage:
            storage.register_mem_pool_host(pool)
            assert await storage.batch_set_v1(["k"], slots(pool, [0])) == [True]
            assert await storage.batch_set_v1(["k"], slots(pool, [1])) == [True]
            assert storage.get_stats()["set_skipped"] == 1
            assert await storage.batch_get_v1(["k"], slots(pool, [2])) == [True]
            assert page_bytes(pool, 2) == page_bytes(pool, 0)

    @pytest.mark.asyncio
    async def test_concurrent_writers_of_one_key(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        async with (
            storage_factory(_config(MHA)) as one,
            storage_factory(_config(MHA)) as two,
        ):
            one.register_mem_pool_host(pool)
            two.register_mem_pool_host(pool)
            results = await asyncio.gather(
                *(s.batch_set_v1(["same", "k2"], slots(pool, [0, 1])) for s in (one, two, one))
            )
            assert all(r == [True, True] for r in results)
            assert await one.batch_get_v1(["same"], slots(pool, [5])) == [True]
            assert page_bytes(pool, 5) == page_bytes(pool, 0)

    @pytest.mark.asyncio
    async def test_clear_removes_every_page(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        async with storage_factory(_config(MHA)) as storage:
            storage.register_mem_pool_host(pool)
            await storage.batch_set_v1(["a", "b"], slots(pool, [0, 1]))
            await storage.clear()
            assert await storage.batch_exists(["a", "b"]) == 0
            assert await storage.batch_get_v1(["a"], slots(pool, [2])) == [False]
            assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [True]

    # -- the tensor API, input checks, lifecycle ------------------------------------------

    @pytest.mark.asyncio
    async def test_tensor_get_and_set(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        async with storage_factory(_config(MHA)) as storage:
            storage.register_mem_pool_host(pool)
            value = pool.get_data_page(3).clone()
            assert await storage.set("t", value)
            assert await storage.batch_set(["t2", "t3"], [value, value])
            got = await storage.get("t")
            assert got is not None
            assert torch.equal(got, value)
            target = torch.zeros_like(value)
            assert await storage.get("t2", target) is target
            assert torch.equal(target, value)
            assert await storage.get("missing") is None
            both = await storage.batch_get(["t3", "nope"])
            assert both[1] is None
            assert both[0] is not None
            assert torch.equal(both[0], value)
            # A page stored through the tensor API reads into host pages too.
            assert await storage.batch_get_v1(["t"], slots(pool, [6])) == [True]
            assert page_bytes(pool, 6) == page_bytes(pool, 3)

    @pytest.mark.asyncio
    async def test_caller_bugs_are_clear_errors(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        async with storage_factory(_config(MHA)) as storage:
            with pytest.raises(ConfigError, match="register_mem_pool_host"):
                await storage.batch_get_v1(["a"], slots(pool, [0]))
            storage.register_mem_pool_host(pool)
            with pytest.raises(LayoutError, match="token slots"):
                await storage.batch_get_v1(["a", "b"], slots(pool, [0]))
            with pytest.raises(LayoutError):
                await storage.batch_set_v1(["a"], slots(pool, [0])[1:].clone())
            with pytest.raises(StorageError, match="list of str"):
                await storage.batch_exists("abc")
            with pytest.raises(StorageError, match=r"keys\[0\]"):
                await storage.batch_exists(["", "x"])
            assert await storage.batch_get_v1([], slots(pool, [])) == []

    @pytest.mark.asyncio
    async def test_aclose_is_idempotent_then_closed(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        storage = storage_factory(_config(MHA))
        storage.register_mem_pool_host(pool)
        await storage.aclose()
        await storage.aclose()
        with pytest.raises(ClosedError):
            await storage.batch_get_v1(["a"], slots(pool, [0]))
        with pytest.raises(ClosedError):
            await storage.batch_exists(["a"])
        with pytest.raises(ClosedError):
            async with storage:
                pass

    @pytest.mark.asyncio
    async def test_stats_are_json(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        async with storage_factory(_config(MHA)) as storage:
            storage.register_mem_pool_host(pool)
            await storage.batch_set_v1(["a"], slots(pool, [0]))
            await storage.batch_get_v1(["a", "b"], slots(pool, [1, 2]))
            stats = storage.get_stats()
            json.dumps(stats)
            assert stats["get_pages"] == 2
            assert stats["get_hits"] == 1
            assert stats["set_written"] == 1

    # -- cancellation ---------------------------------------------------------------------

    def _big_layout(self) -> KVLayout:
        # 192 KiB pages: big enough that a batch of them takes a while.
        return KVLayout(num_layers=6, num_kv_heads=8, head_dim=64, page_size=16, dtype="bf16")

    @pytest.mark.asyncio
    async def test_cancelled_set_leaves_whole_pages_or_none(
        self, storage_factory: StorageFactory
    ) -> None:
        layout, n = self._big_layout(), self.cancel_pages
        src = filled_pool(layout, HostLayout.LAYER_FIRST, pages=n, seed=5)
        keys = [f"c{i}" for i in range(n)]
        async with storage_factory(_config(layout)) as storage:
            storage.register_mem_pool_host(src)
            for delay in (0.0, 0.001, 0.005):
                await storage.clear()
                task = asyncio.ensure_future(storage.batch_set_v1(keys, slots(src, list(range(n)))))
                await asyncio.sleep(delay)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await self._check_whole_pages(storage_factory, layout, src, keys)

    async def _check_whole_pages(
        self, factory: StorageFactory, layout: KVLayout, src: HostKVPool, keys: list[str]
    ) -> None:
        dst = HostKVPool(layout, len(keys), HostLayout.PAGE_FIRST, pin_memory=False)
        async with factory(_config(layout)) as reader:
            reader.register_mem_pool_host(dst)
            found = await reader.batch_get_v1(keys, slots(dst, list(range(len(keys)))))
            for i, ok in enumerate(found):
                if ok:
                    assert page_bytes(dst, i) == page_bytes(src, i), f"page {i} is partial"
            assert reader.get_stats()["error_count"] == 0

    @pytest.mark.asyncio
    async def test_cancelled_get_stops_writing_host_pages(
        self, storage_factory: StorageFactory
    ) -> None:
        layout, n = self._big_layout(), self.cancel_pages
        src = filled_pool(layout, pages=n, seed=6)
        dst = HostKVPool(layout, n, HostLayout.PAGE_FIRST, pin_memory=False)
        keys = [f"g{i}" for i in range(n)]
        async with storage_factory(_config(layout)) as storage:
            storage.register_mem_pool_host(src)
            assert all(await storage.batch_set_v1(keys, slots(src, list(range(n)))))
            storage.register_mem_pool_host(dst)
            threads_after: list[int] = []
            for delay in (0.0, 0.001, 0.003, 0.001, 0.0, 0.002, 0.0, 0.001):
                task = asyncio.ensure_future(storage.batch_get_v1(keys, slots(dst, list(range(n)))))
                await asyncio.sleep(delay)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                # Once the call has returned, nothing may write into the host pages any more.
                dst.buffer.view(-1).view(torch.uint8).fill_(0xAB)
                await asyncio.sleep(0.02)
                assert bool((dst.buffer.view(-1).view(torch.uint8) == 0xAB).all())
                threads_after.append(threading.active_count())
            # Worker threads are reused, not leaked: six more cancellations add at most the
            # two whose calls may still be in a blocking read when the next call starts (a
            # leak would add one each; the exact bound failed now and then on a busy machine).
            assert max(threads_after[2:]) <= threads_after[1] + 2

    # -- faults ---------------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_flaky_backend_means_misses_not_exceptions(
        self, storage_factory: StorageFactory
    ) -> None:
        pool = filled_pool(MHA)
        async with FlakyStorage(storage_factory(_config(MHA)), fail_rate=0.0) as storage:
            storage.register_mem_pool_host(pool)
            assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [True]
            storage.down = True
            assert await storage.batch_set_v1(["b"], slots(pool, [1])) == [False]
            assert await storage.batch_get_v1(["a"], slots(pool, [2])) == [False]
            assert await storage.batch_exists(["a"]) == 0
            stats = storage.get_stats()
            assert stats["errors"]["storage"] == 3
            assert stats["set_failed"] == 1
            storage.down = False
            assert await storage.batch_get_v1(["a"], slots(pool, [2])) == [True]

    @pytest.mark.asyncio
    async def test_corrupt_reads_are_misses(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        async with CorruptingStorage(storage_factory(_config(MHA)), rate=1.0) as storage:
            storage.register_mem_pool_host(pool)
            await storage.batch_set_v1(["a", "b"], slots(pool, [0, 1]))
            assert await storage.batch_get_v1(["a", "b"], slots(pool, [2, 3])) == [False, False]
            assert storage.get_stats()["errors"]["corrupt"] == 2

    @pytest.mark.asyncio
    async def test_slow_backend_can_be_timed_out(self, storage_factory: StorageFactory) -> None:
        pool = filled_pool(MHA)
        async with SlowStorage(storage_factory(_config(MHA)), delay=5.0) as storage:
            storage.register_mem_pool_host(pool)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await storage.batch_set_v1(["a"], slots(pool, [0]))
            storage.delay = 0.0
            assert await storage.batch_exists(["a"]) == 0
