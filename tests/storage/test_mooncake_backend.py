"""The Mooncake backend beyond the conformance kit: zero-copy registration, pages damaged or
resized in the store, a store node that dies, an unreachable master, and its options."""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from typing import Any

import numpy as np
import pytest

from hicache_async.errors import ConfigError
from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig, create_storage
from hicache_async.testing.mooncake_server import MooncakeStore, mooncake_missing
from hicache_async.testing.redis_server import free_port
from hicache_async.testing.storage import MHA, filled_pool, page_bytes, slots

pytestmark = pytest.mark.one_loop

CONFIG = HiCacheStorageConfig(model_name="m")


def make(store: MooncakeStore, **options: Any) -> HiCacheStorage:
    options.setdefault("prefix", f"t{uuid.uuid4().hex[:12]}:")
    return create_storage("mooncake", CONFIG, **store.options(**options))


def raw_client(store: MooncakeStore) -> Any:
    """A bare Mooncake client, to tamper with what the backend stored."""
    from mooncake.store import MooncakeDistributedStore

    client = MooncakeDistributedStore()
    rc = client.setup("127.0.0.1", "P2PHANDSHAKE", 0, 16 << 20, "tcp", "", store.master_address)
    assert rc == 0
    return client


async def test_host_pool_is_registered_for_zero_copy(mooncake_store: MooncakeStore) -> None:
    src, dst = filled_pool(MHA, seed=1), filled_pool(MHA, seed=2)
    async with make(mooncake_store) as storage:
        storage.register_mem_pool_host(src)
        assert await storage.batch_set_v1(["a", "b"], slots(src, [0, 5])) == [True, True]
        assert src.buffer.data_ptr() in storage._registered  # type: ignore[attr-defined]
        storage.register_mem_pool_host(dst)  # a new pool replaces the old registration
        assert await storage.batch_get_v1(["b", "a"], slots(dst, [1, 2])) == [True, True]
        registered = storage._registered  # type: ignore[attr-defined]
        assert dst.buffer.data_ptr() in registered
        assert src.buffer.data_ptr() not in registered
    assert page_bytes(dst, 1) == page_bytes(src, 5)
    assert page_bytes(dst, 2) == page_bytes(src, 0)


async def test_damaged_page_is_a_miss_and_is_removed(mooncake_store: MooncakeStore) -> None:
    pool = filled_pool(MHA)
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    async with make(mooncake_store, prefix=prefix) as storage:
        storage.register_mem_pool_host(pool)
        assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [True]
        # Overwrite the stored object with the same number of bytes, one of them flipped.
        client = raw_client(mooncake_store)
        name = prefix + "a" + storage.suffix
        size = client.get_size(name)
        data = np.zeros(size, dtype=np.uint8)
        assert client.get_into(name, data.ctypes.data, size) == size
        data[10] ^= 0xFF
        assert client.remove(name, force=True) == 0
        assert client.put_from(name, data.ctypes.data, size) == 0
        before = page_bytes(pool, 3)
        assert await storage.batch_get_v1(["a"], slots(pool, [3])) == [False]
        assert storage.get_stats()["errors"]["corrupt"] == 1
        assert client.is_exist(name) == 0  # removed, so it can be written again
        client.close()
        assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [True]
        assert await storage.batch_get_v1(["a"], slots(pool, [3])) == [True]
        assert page_bytes(pool, 3) == page_bytes(pool, 0) != before


async def test_page_of_another_size_is_a_miss(mooncake_store: MooncakeStore) -> None:
    pool = filled_pool(MHA)
    prefix = f"t{uuid.uuid4().hex[:12]}:"
    async with make(mooncake_store, prefix=prefix) as storage:
        storage.register_mem_pool_host(pool)
        client = raw_client(mooncake_store)
        junk = np.ones(100, dtype=np.uint8)
        assert client.put_from(prefix + "a" + storage.suffix, junk.ctypes.data, 100) == 0
        client.close()
        assert await storage.batch_exists(["a"]) == 1
        assert await storage.batch_get_v1(["a"], slots(pool, [1])) == [False]
        assert storage.get_stats()["error_count"] == 1


async def test_clear_removes_only_its_prefix(mooncake_store: MooncakeStore) -> None:
    pool = filled_pool(MHA)
    async with make(mooncake_store) as mine, make(mooncake_store) as other:
        mine.register_mem_pool_host(pool)
        other.register_mem_pool_host(pool)
        assert await mine.batch_set_v1(["a", "b"], slots(pool, [0, 1])) == [True, True]
        assert await other.batch_set_v1(["a"], slots(pool, [2])) == [True]
        await mine.clear()
        assert await mine.batch_exists(["a", "b"]) == 0
        assert await other.batch_exists(["a"]) == 1


async def test_existing_pages_are_skipped_not_rewritten(mooncake_store: MooncakeStore) -> None:
    pool = filled_pool(MHA)
    async with make(mooncake_store) as storage:
        storage.register_mem_pool_host(pool)
        assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [True]
        assert await storage.batch_set_v1(["a", "b"], slots(pool, [4, 1])) == [True, True]
        assert await storage.batch_get_v1(["a"], slots(pool, [2])) == [True]
        assert page_bytes(pool, 2) == page_bytes(pool, 0)  # not page 4's bytes
        stats = storage.get_stats()
        assert stats["set_skipped"] == 1
        assert stats["set_written"] == 2


async def test_dead_store_node_means_misses(mooncake_own_store: MooncakeStore) -> None:
    pool = filled_pool(MHA)
    async with make(mooncake_own_store) as storage:
        storage.register_mem_pool_host(pool)
        assert await storage.batch_set_v1(["a", "b"], slots(pool, [0, 1])) == [True, True]
        mooncake_own_store.kill_node()
        assert await storage.batch_get_v1(["a"], slots(pool, [5])) == [False]
        assert await storage.batch_set_v1(["c"], slots(pool, [2])) == [False]
        stats = storage.get_stats()
        assert stats["error_count"] >= 2
        assert stats["set_failed"] == 1


async def test_unreachable_master_means_misses_not_exceptions(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if (missing := mooncake_missing()) is not None:
        pytest.skip(missing)
    pool = filled_pool(MHA)
    options = {"master_server_address": f"127.0.0.1:{free_port()}", "setup_retries": 1}
    async with create_storage("mooncake", CONFIG, **options) as storage:
        storage.register_mem_pool_host(pool)
        assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [False]
        assert await storage.batch_get_v1(["a"], slots(pool, [1])) == [False]
        assert await storage.batch_exists(["a"]) == 0
        stats = storage.get_stats()
        assert stats["errors"]["storage"] == 3
    assert "mooncake setup failed" in caplog.text


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="protocl"):
        create_storage("mooncake", CONFIG, protocl="tcp")
    with pytest.raises(ConfigError, match="protocol"):
        create_storage("mooncake", CONFIG, protocol="udp")
    with pytest.raises(ConfigError, match="replicas"):
        create_storage("mooncake", CONFIG, replicas=0)


def test_missing_client_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mooncake.store", None)
    with pytest.raises(ConfigError, match="pip install mooncake-transfer-engine"):
        create_storage("mooncake", CONFIG)


def _own_tcp_peers() -> list[str]:
    """Remote addresses of this process's connected TCP sockets (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    peers = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote, state, inode = fields[2], fields[3], fields[9]
                if inode in inodes and state == "01":  # ESTABLISHED
                    peers.append(remote.split(":")[0])
    return peers


def _loopback(hex_addr: str) -> bool:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:  # IPv4, little-endian words
        return raw[::-1][0] == 127
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    if words[:12] == b"\0" * 10 + b"\xff\xff":  # IPv4-mapped
        return words[12] == 127
    return words == b"\0" * 15 + b"\1"


@pytest.mark.skipif(not os.path.exists("/proc/self/net/tcp"), reason="needs Linux /proc")
async def test_traffic_stays_on_loopback(mooncake_store: MooncakeStore) -> None:
    src, dst = filled_pool(MHA, seed=1), filled_pool(MHA, seed=2)
    async with make(mooncake_store) as storage:
        storage.register_mem_pool_host(src)
        assert await storage.batch_set_v1(["a"], slots(src, [0])) == [True]
        storage.register_mem_pool_host(dst)
        assert await storage.batch_get_v1(["a"], slots(dst, [0])) == [True]
        peers = _own_tcp_peers()
        assert peers, "the client holds connections to the master and the store node"
        assert all(_loopback(p) for p in peers), peers
