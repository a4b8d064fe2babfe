"""Redis backend faults: a server killed mid-batch, a server that is down, corrupt values."""

from __future__ import annotations

import asyncio
import socket

from hicache_async.layout import KVLayout
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.redis_server import RedisProcess, free_port
from hicache_async.testing.storage import MHA, filled_pool, page_bytes, slots
from hicache_redis import RedisStorage

CONFIG = HiCacheStorageConfig(model_name="m")
BIG = KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, page_size=16, dtype="bf16")  # 512 KiB


def _open(port: int, **options: object) -> RedisStorage:
    storage = create_storage("redis", CONFIG, port=port, **options)
    assert isinstance(storage, RedisStorage)
    return storage


def _command(port: int, *args: str) -> bytes:
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        parts.append(f"${len(arg.encode())}\r\n{arg}\r\n".encode())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(parts))
        return s.recv(1024)


async def test_server_killed_mid_batch_then_restarted(redis_own_node: RedisProcess) -> None:
    n = 64
    pool = filled_pool(BIG, pages=n)
    keys = [f"k{i}" for i in range(n)]
    async with _open(redis_own_node.port, batch_keys=4, socket_timeout=2.0) as storage:
        storage.register_mem_pool_host(pool)
        assert all(await storage.batch_set_v1(keys[:8], slots(pool, list(range(8)))))

        async def kill_soon() -> None:
            await asyncio.sleep(0.01)
            await asyncio.to_thread(redis_own_node.kill)

        killer = asyncio.ensure_future(kill_soon())
        stored = await storage.batch_set_v1(keys, slots(pool, list(range(n))))
        await killer
        assert not all(stored)  # the server died during the batch: some sets failed
        errors_after_kill = storage.get_stats()["error_count"]
        assert errors_after_kill > 0
        # While it is down: misses and counted errors, no exception.
        assert await storage.batch_get_v1(keys[:2], slots(pool, [0, 1])) == [False, False]
        assert await storage.batch_exists(keys) == 0
        assert storage.get_stats()["error_count"] > errors_after_kill
        # Back on the same port (empty: no persistence): the backend reconnects by itself.
        await asyncio.to_thread(redis_own_node.start)
        assert await storage.batch_set_v1(keys[:2], slots(pool, [0, 1])) == [True, True]
        assert await storage.batch_get_v1(keys[:2], slots(pool, [10, 11])) == [True, True]
        assert page_bytes(pool, 10) == page_bytes(pool, 0)
        assert set(storage.get_stats()["errors"]) <= {"connection", "timeout"}


async def test_server_down_from_the_start() -> None:
    port = free_port()
    async with _open(port, connect_timeout=0.5) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        assert await storage.batch_set_v1(["a", "b"], slots(pool, [0, 1])) == [False, False]
        assert await storage.batch_get_v1(["a"], slots(pool, [2])) == [False]
        assert await storage.batch_exists(["a"]) == 0
        stats = storage.get_stats()
        assert stats["errors"]["connection"] >= 3
        assert stats["set_failed"] == 2


async def test_corrupt_value_is_a_miss(redis_node: RedisProcess) -> None:
    redis_node.flushall()
    async with _open(redis_node.port) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        await storage.batch_set_v1(["a", "b"], slots(pool, [0, 1]))
        key = storage.redis_options.prefix + "a" + storage.suffix
        assert _command(redis_node.port, "SETRANGE", key, "10", "X").startswith(b":")
        before = page_bytes(pool, 6)
        assert await storage.batch_get_v1(["a", "b"], slots(pool, [6, 7])) == [False, True]
        assert page_bytes(pool, 6) == before
        assert storage.get_stats()["errors"] == {"corrupt": 1}
        assert not await storage.exists("a")  # dropped, so it can be written again


async def test_ttl_sets_an_expiry(redis_node: RedisProcess) -> None:
    redis_node.flushall()
    async with _open(redis_node.port, ttl_seconds=100) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        await storage.batch_set_v1(["a"], slots(pool, [0]))
        key = storage.redis_options.prefix + "a" + storage.suffix
        ttl = int(_command(redis_node.port, "TTL", key)[1:].strip())
        assert 0 < ttl <= 100


async def test_unresponsive_server_times_out_as_misses(redis_own_node: RedisProcess) -> None:
    async with _open(redis_own_node.port, socket_timeout=0.3, op_timeout=2.0) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [True]
        # The server stops answering every client for 1.5 s (it stays connected).
        assert _command(redis_own_node.port, "CLIENT", "PAUSE", "1500", "ALL").startswith(b"+OK")
        start = asyncio.get_running_loop().time()
        assert await storage.batch_get_v1(["a"], slots(pool, [1])) == [False]
        assert asyncio.get_running_loop().time() - start < 1.4
        assert storage.get_stats()["errors"].get("timeout", 0) >= 1
        await asyncio.sleep(1.5)
        assert await storage.batch_get_v1(["a"], slots(pool, [1])) == [True]
