"""Prefetch deadlines that bound: the linear deadline covers the existence check too, a prefetch
without one is bounded, terminate() cuts wherever the prefetch is, a worker thread stuck in a
read is left behind with its pages quarantined, and an unexpected error is a counted miss.

Each request is shown to end while its backend is still stalled (the stall is released only
after the assertions); nothing here asserts a duration.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig
from hicache_async._state import CacheState
from hicache_async.metrics import Transition
from hicache_async.radix import RadixKey
from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig, PageBuffer, create_storage
from hicache_async.storage.threads import run_in_threads
from hicache_async.testing.faults import ForwardingStorage
from hicache_async.testing.redis_server import RedisProcess, require_redis_server
from hicache_async.tiers.prefetch import (
    PrefetchControl,
    Prefetcher,
    PrefetchOutcome,
    PrefetchResult,
)
from tests.test_cache_e2e import serve

from .conftest import LAYOUT, Rig
from .test_prefetch import TOKENS, make, store_pages

PS = LAYOUT.page_size
LIVENESS_S = 10.0  # only turns a hang (the defect) into a failure


class AsyncStall(ForwardingStorage):
    """An async backend call that does not return until ``release`` (a paused server):
    the existence check (``exists=True``) or the reads from the ``from_call``-th on."""

    def __init__(self, inner: HiCacheStorage, *, exists: bool, from_call: int = 0) -> None:
        super().__init__(inner)
        self.exists, self.from_call = exists, from_call
        self.reads = 0
        self.entered = anyio.Event()
        self.released = anyio.Event()

    async def _stall(self) -> None:
        self.entered.set()
        await self.released.wait()

    async def _leading(self, keys: list[str]) -> int:
        if self.exists:
            await self._stall()
        return await super()._leading(keys)

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        self.reads += 1
        if not self.exists and self.reads > self.from_call:
            await self._stall()
        return await super()._read_pages(keys, buffers)


class ThreadStall(ForwardingStorage):
    """Reads in worker threads (as the file backend does); from the ``from_call``-th read on,
    the thread blocks in its first page until ``release`` is set (a thread in the kernel)."""

    def __init__(self, inner: HiCacheStorage, *, from_call: int) -> None:
        super().__init__(inner)
        self.from_call = from_call
        self.reads = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()
        self.limiter = anyio.CapacityLimiter(2)

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        self.reads += 1
        if self.reads <= self.from_call:
            return await super()._read_pages(keys, buffers)

        def stuck(i: int) -> None:
            self.entered.set()
            self.release.wait()
            for segment in buffers[i]:  # what a late read does: write into its page
                segment[:] = b"\xee" * len(segment)
            self.returned.set()

        await run_in_threads(stuck, len(keys), limiter=self.limiter, workers=1)
        return [False] * len(keys)


def wrapped(rig: Rig, cls: type[ForwardingStorage], **kw: Any) -> Any:
    storage = cls(rig.storage, **kw)
    storage.register_mem_pool_host(rig.pool)
    return storage


async def ended(fn: Any) -> list[PrefetchResult]:
    """Run ``fn()``; a hang past the liveness guard is a failure, not a wait for ever."""
    results: list[PrefetchResult] = []
    with anyio.move_on_after(LIVENESS_S):
        results.append(await fn())
    assert results, "the prefetch did not end while its backend was stalled"
    return results


async def test_the_deadline_covers_the_existence_check(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    stall = wrapped(rig, AsyncStall, exists=True)
    key = RadixKey(TOKENS)
    prefetcher = make(rig, storage=stall)
    (result,) = await ended(
        lambda: prefetcher.fetch(key, rig.tree.match_prefix(key), deadline_s=0.05)
    )
    assert not stall.released.is_set()  # ended while L3 still holds the existence check
    assert result.outcome is PrefetchOutcome.TIMED_OUT
    assert (result.found_pages, result.arrived_pages) == (0, 0)
    assert rig.counters.prefetch_timed_out == 1
    assert rig.pool.allocator.available == 32
    assert prefetcher.inflight_pages == 0
    stall.released.set()


async def test_terminate_cuts_the_existence_check(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    stall = wrapped(rig, AsyncStall, exists=True)
    key = RadixKey(TOKENS)
    prefetcher = make(rig, storage=stall)
    control = PrefetchControl()
    results: list[PrefetchResult] = []
    with anyio.move_on_after(LIVENESS_S):
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                results.append(
                    await prefetcher.fetch(key, rig.tree.match_prefix(key), control=control)
                )

            tg.start_soon(run)
            await stall.entered.wait()
            control.terminate()
    assert results, "terminate() did not end the prefetch"
    assert not stall.released.is_set()
    assert results[0].outcome is PrefetchOutcome.PARTIAL
    assert rig.counters.prefetch_partial == 1
    assert rig.pool.allocator.available == 32
    stall.released.set()


async def test_terminate_before_the_prefetch_starts_fetches_nothing(rig: Rig) -> None:
    """best_effort: load() may terminate the prefetch before its task has run at all."""
    await store_pages(rig, TOKENS, 10)
    stall = wrapped(rig, AsyncStall, exists=True)
    key = RadixKey(TOKENS)
    control = PrefetchControl()
    control.terminate()
    (result,) = await ended(
        lambda: make(rig, storage=stall).fetch(key, rig.tree.match_prefix(key), control=control)
    )
    assert not stall.released.is_set()
    assert (result.outcome, result.arrived_pages) == (PrefetchOutcome.PARTIAL, 0)
    assert stall.reads == 0  # it never got as far as reading
    assert rig.pool.allocator.available == 32
    stall.released.set()


@pytest.mark.parametrize("from_call", [0, 1])
async def test_a_prefetch_without_a_deadline_is_bounded(rig: Rig, from_call: int) -> None:
    """wait_complete passes no deadline: ``max_wait_s`` bounds it; the arrived prefix stays."""
    await store_pages(rig, TOKENS, 10)
    stall = wrapped(rig, AsyncStall, exists=False, from_call=from_call)
    key = RadixKey(TOKENS)
    prefetcher = make(rig, storage=stall, batch_pages=2, max_wait_s=0.05)
    (result,) = await ended(lambda: prefetcher.fetch(key, rig.tree.match_prefix(key)))
    assert not stall.released.is_set()
    assert result.outcome is PrefetchOutcome.TIMED_OUT
    assert result.arrived_pages == 2 * from_call
    assert rig.tree.match_prefix(key).host_hit_length == 2 * from_call * PS
    assert rig.pool.allocator.available == 32 - 2 * from_call
    assert prefetcher.inflight_pages == 0
    stall.released.set()


async def test_a_thread_stuck_in_a_read_is_left_behind_with_its_pages_quarantined(
    rig: Rig,
) -> None:
    await store_pages(rig, TOKENS, 10)
    stall = wrapped(rig, ThreadStall, from_call=1)  # the second batch's thread sticks
    key = RadixKey(TOKENS)
    prefetcher = make(rig, storage=stall, batch_pages=2)
    try:
        (result,) = await ended(
            lambda: prefetcher.fetch(key, rig.tree.match_prefix(key), deadline_s=0.05)
        )
        assert stall.entered.is_set()
        assert not stall.returned.is_set()  # the request ended; its thread is still blocked
        assert result.outcome is PrefetchOutcome.TIMED_OUT
        assert result.arrived_pages == 2  # the first batch; the stuck one is never handed out
        match = rig.tree.match_prefix(key)
        assert match.host_hit_length == 2 * PS
        # The stuck batch's 2 pages stay reserved (counted), the other 6 were freed.
        assert prefetcher.inflight_pages == 2
        assert prefetcher.quarantined.count == 1
        assert rig.pool.allocator.available == 32 - 2 - 2
        stats = stall.get_stats()
        assert (stats["threads_left_behind"], stats["threads_stuck"]) == (1, 1)
        assert stall.limiter.borrowed_tokens == 1  # the stuck thread keeps its token
        rig.tree.check()
        kept = rig.page_bytes(match.last_host_node.host_indices)
    finally:
        stall.release.set()
    await prefetcher.quarantined.wait_idle()  # freed on the loop once the thread returned
    assert stall.returned.is_set()
    assert prefetcher.inflight_pages == 0
    assert rig.pool.allocator.available == 32 - 2
    assert stall.get_stats()["threads_stuck"] == 0
    assert stall.limiter.borrowed_tokens == 0
    # The late write went into the quarantined pages only, never into a page in the tree.
    assert rig.page_bytes(rig.tree.match_prefix(key).last_host_node.host_indices) == kept


class ThreadStallExists(ForwardingStorage):
    """An existence check in a worker thread that blocks until ``release`` (as Mooncake's
    runs its client's calls)."""

    def __init__(self, inner: HiCacheStorage) -> None:
        super().__init__(inner)
        self.release = threading.Event()

    async def _leading(self, keys: list[str]) -> int:
        def stuck(_i: int) -> None:
            self.release.wait()

        await run_in_threads(stuck, 1, limiter=anyio.CapacityLimiter(1), workers=1)
        return 0


async def test_a_thread_stuck_in_the_existence_check_is_left_behind(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    stall = wrapped(rig, ThreadStallExists)
    key = RadixKey(TOKENS)
    prefetcher = make(rig, storage=stall)
    try:
        (result,) = await ended(
            lambda: prefetcher.fetch(key, rig.tree.match_prefix(key), deadline_s=0.05)
        )
        assert result.outcome is PrefetchOutcome.TIMED_OUT
        assert stall.get_stats()["threads_stuck"] == 1
        assert prefetcher.inflight_pages == 0  # it was given no page
        assert rig.pool.allocator.available == 32
    finally:
        stall.release.set()
    while stall.get_stats()["threads_stuck"]:  # noqa: ASYNC110 (counted back on its return)
        await anyio.sleep(0.001)
    assert stall.get_stats()["threads_left_behind"] == 1


async def test_quarantined_pages_count_against_the_prefetch_capacity(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    stall = wrapped(rig, ThreadStall, from_call=0)
    key = RadixKey(TOKENS)
    prefetcher = make(rig, storage=stall, batch_pages=10, capacity_pages=10)
    try:
        (first,) = await ended(
            lambda: prefetcher.fetch(key, rig.tree.match_prefix(key), deadline_s=0.05)
        )
        assert first.outcome is PrefetchOutcome.TIMED_OUT
        assert prefetcher.inflight_pages == 10
        # The stuck thread may still write all ten pages: a new prefetch gets none of them.
        (second,) = await ended(lambda: prefetcher.fetch(key, rig.tree.match_prefix(key)))
        assert second.outcome is PrefetchOutcome.REFUSED
    finally:
        stall.release.set()
    await prefetcher.quarantined.wait_idle()
    assert rig.pool.allocator.available == 32
    assert prefetcher.inflight_pages == 0


async def test_pages_of_a_thread_back_before_the_commit_are_freed_once(rig: Rig) -> None:
    """The stuck thread returns while the prefetch is still in its (tensor-parallel) arrival
    round: its pages are freed on its return, and the commit does not free them again (the
    allocator refuses a double free)."""
    await store_pages(rig, TOKENS, 10)
    stall = wrapped(rig, ThreadStall, from_call=1)
    key = RadixKey(TOKENS)
    prefetcher: Prefetcher | None = None

    async def agree(tag: int, values: Any) -> list[int]:
        if tag & 3 == 2:  # the arrival round: the thread comes back now
            assert prefetcher is not None
            assert prefetcher.quarantined.count == 1
            stall.release.set()
            await prefetcher.quarantined.wait_idle()
        return list(values)

    prefetcher = make(rig, storage=stall, batch_pages=2, agree=agree)
    try:
        (result,) = await ended(
            lambda: prefetcher.fetch(key, rig.tree.match_prefix(key), deadline_s=0.05, tag=8)
        )
    finally:
        stall.release.set()
    assert result.outcome is PrefetchOutcome.TIMED_OUT
    assert result.arrived_pages == 2
    assert prefetcher.inflight_pages == 0
    assert rig.pool.allocator.available == 32 - 2


class Broken(ForwardingStorage):
    """A backend whose public call raises something that is not a miss (a bug, an
    untranslated client error)."""

    async def batch_get_v1(self, keys: Any, host_indices: Any, extra_info: Any = None) -> Any:
        raise RuntimeError("client bug")


async def test_an_unexpected_backend_error_is_a_counted_miss(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    key = RadixKey(TOKENS)
    prefetcher = make(rig, storage=wrapped(rig, Broken))
    result = await prefetcher.fetch(key, rig.tree.match_prefix(key))
    assert result.outcome is PrefetchOutcome.FAILED
    assert rig.counters.transitions[Transition.PREFETCH].failures == 1
    assert rig.tree.match_prefix(key).host_hit_length == 0
    assert rig.pool.allocator.available == 32
    assert prefetcher.inflight_pages == 0
    assert prefetcher.running.count == 0


async def test_a_hashing_error_is_a_counted_miss(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad keys are refused at the edge (``RadixKey``); should one still fail in the page
    hashing (a bug), the prefetch is a miss, not an error in the cache's task group. The
    hashing is replaced here because the edge no longer lets a real bad key through."""

    def broken(*args: object) -> list[str]:
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    monkeypatch.setattr("hicache_async.tiers.prefetch.hash_pages", broken)
    key = RadixKey(TOKENS)
    prefetcher = make(rig)
    result = await prefetcher.fetch(key, rig.tree.match_prefix(key))
    assert result.outcome is PrefetchOutcome.FAILED
    assert rig.counters.transitions[Transition.PREFETCH].failures == 1
    assert rig.pool.allocator.available == 32
    assert prefetcher.running.count == 0


# -- through the cache: a real paused redis-server, a stuck thread under best_effort ------

CACHE_PROMPT = torch.arange(700, 700 + 24 * PS)  # 24 pages


def cache_config(policy: str) -> HiCacheConfig:
    return HiCacheConfig(
        layout=LAYOUT,
        device="cpu",
        device_pages=64,
        host_pages=128,
        storage_backend="memory",  # replaced by the storage each test passes
        write_policy="write_through",
        prefetch_policy=policy,
        prefetch_threshold=4,
        prefetch_timeout_base=0.05,
        prefetch_timeout_per_ki_token=0.0,
    )


async def only_in_l3(cache: HiCache) -> None:
    """Serve the prompt (written through to L3), then drop it from L1 and L2."""
    await serve(cache, CACHE_PROMPT)
    await cache.drain()
    cache.device_tier.evict(cache.l1.allocator.usable)
    assert cache.host_tier is not None
    cache.host_tier.evict(cache.l1.allocator.usable * 4)
    match = cache.match_prefix(cache.key(CACHE_PROMPT))
    assert match.device_hit_length + match.host_hit_length == 0


def _info_pid(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"INFO server\r\n")
        data = b""
        while b"process_id:" not in data or not data.endswith(b"\r\n"):
            data += s.recv(65536)
    line = next(x for x in data.split(b"\r\n") if x.startswith(b"process_id:"))
    return int(line.split(b":")[1])


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    try:
        require_redis_server()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("policy", ["timeout", "wait_complete", "best_effort"])
async def test_a_paused_redis_does_not_hold_the_request(
    redis_server: RedisProcess, policy: str
) -> None:
    """redis-server stopped with SIGSTOP (connected, silent: its socket timeout is 5 s): the
    request's prefetch ends at its bound (timeout: the linear deadline, wait_complete: the
    overall bound, best_effort: load() terminating it) while the server is still stopped."""
    storage = create_storage("redis", HiCacheStorageConfig(model_name="m"), port=redis_server.port)
    async with HiCache.open(cache_config(policy), storage=storage) as cache:
        assert cache.prefetcher is not None
        cache.prefetcher.max_wait_s = 0.05  # what prefetch_wait_complete_timeout sets
        await only_in_l3(cache)
        before = cache.stats().prefetch
        pid = _info_pid(redis_server.port)
        os.kill(pid, signal.SIGSTOP)
        try:
            while not _stopped(pid):  # noqa: ASYNC110 (the signal lands asynchronously)
                await anyio.sleep(0.001)
            results: list[tuple[PrefetchResult, int]] = []
            with anyio.move_on_after(LIVENESS_S):
                async with cache.session(CACHE_PROMPT) as s:
                    result = await s.prefetch()
                    hit = await s.load()
                    results.append((result, hit.length))
            assert _stopped(pid)  # the request ended while the server is still paused
            assert results, "the request did not end while redis was paused"
            ((result, hit_length),) = results
            expected = {
                "timeout": PrefetchOutcome.TIMED_OUT,
                "wait_complete": PrefetchOutcome.TIMED_OUT,
                "best_effort": PrefetchOutcome.STARTED,
            }[policy]
            assert result.outcome is expected
            assert hit_length == 0
        finally:
            os.kill(pid, signal.SIGCONT)
        after = cache.stats().prefetch
        assert after.timed_out + after.partial == before.timed_out + before.partial + 1
        await cache.drain()
        assert cache.prefetcher.inflight_pages == 0


async def test_a_thread_stuck_under_best_effort_holds_neither_load_nor_close() -> None:
    """A read thread stuck in the kernel: load() (which terminates the prefetch) returns, and
    leaving the cache closes it, while the thread is still blocked; its pages come back when
    it returns."""
    inner = create_storage("memory", HiCacheStorageConfig(model_name="m"))
    stall = ThreadStall(inner, from_call=0)
    cache = HiCache(cache_config("best_effort"), storage=stall)
    try:
        with anyio.move_on_after(LIVENESS_S):
            async with cache:
                assert cache.prefetcher is not None
                await only_in_l3(cache)
                async with cache.session(CACHE_PROMPT) as s:
                    assert (await s.prefetch()).outcome is PrefetchOutcome.STARTED
                    await anyio.to_thread.run_sync(stall.entered.wait)
                    hit = await s.load()
                assert hit.length == 0
        assert cache.state is CacheState.CLOSED, "close did not end while a thread was stuck"
        assert not stall.returned.is_set()
        assert stall.get_stats()["threads_stuck"] == 1
        assert cache.prefetcher is not None
        assert cache.prefetcher.inflight_pages == 24
    finally:
        stall.release.set()
    await cache.prefetcher.quarantined.wait_idle()
    assert cache.prefetcher.inflight_pages == 0
    assert cache.host_pool is not None
    assert cache.host_pool.allocator.used == 0


def test_the_overall_bound_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HICACHE_PREFETCH_WAIT_COMPLETE_TIMEOUT", "0.5")
    config = HiCacheConfig(layout=LAYOUT, storage_backend="none")
    assert config.prefetch_wait_complete_timeout == 0.5
    # The prefetcher's own default is the setting's (the cache passes the setting).
    default = HiCacheConfig.model_fields["prefetch_wait_complete_timeout"].default
    assert inspect.signature(Prefetcher).parameters["max_wait_s"].default == default
