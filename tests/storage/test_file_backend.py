"""File backend specifics: on-disk faults, capacity, fsync, paths."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import hicache_file._pageio as pageio
from hicache_async.layout import KVLayout
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.storage import MHA, filled_pool, page_bytes, slots
from hicache_file import FileStorage

CONFIG = HiCacheStorageConfig(model_name="m")


def _open(path: Path, **options: object) -> FileStorage:
    storage = create_storage("file", CONFIG, path=path, **options)
    assert isinstance(storage, FileStorage)
    return storage


async def _stored(path: Path, keys: list[str]) -> tuple[FileStorage, list[str]]:
    storage = _open(path)
    storage.register_mem_pool_host(filled_pool(MHA))
    pool = storage.mem_pool_host
    assert pool is not None
    assert all(await storage.batch_set_v1(keys, slots(pool, list(range(len(keys))))))
    return storage, [storage.path_of(k + storage.suffix) for k in keys]


async def _read_back(storage: FileStorage, keys: list[str]) -> list[bool]:
    pool = storage.mem_pool_host
    assert pool is not None
    return await storage.batch_get_v1(keys[:1], slots(pool, [7]))


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("where", ["payload", "trailer", "checksum-field"])
async def test_flipped_byte_is_a_counted_miss(tmp_path: Path, where: str) -> None:
    storage, paths = await _stored(tmp_path, ["a"])
    size = os.path.getsize(paths[0])
    offset = {"payload": 100, "trailer": size - 40, "checksum-field": size - 24}[where]
    _flip(paths[0], offset)
    async with storage:
        pool = storage.mem_pool_host
        assert pool is not None
        assert await storage.batch_get_v1(["a"], slots(pool, [7])) == [False]
        assert storage.get_stats()["errors"] == {"corrupt": 1}
        # The bad file is gone, so the key can be stored again.
        assert not os.path.exists(paths[0])
        assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [True]
        assert await storage.batch_get_v1(["a"], slots(pool, [7])) == [True]
        assert page_bytes(pool, 7) == page_bytes(pool, 0)


@pytest.mark.parametrize("keep", [0, 10, 1535, 1536 + 63, 1536 + 65])
async def test_truncated_or_extended_file_is_a_miss(tmp_path: Path, keep: int) -> None:
    storage, paths = await _stored(tmp_path, ["a"])
    if keep > os.path.getsize(paths[0]):
        with open(paths[0], "ab") as f:
            f.write(b"x" * (keep - os.path.getsize(paths[0])))
    else:
        os.truncate(paths[0], keep)
    async with storage:
        assert await _read_back(storage, ["a"]) == [False]
        assert storage.get_stats()["errors"] == {"corrupt": 1}


async def test_page_of_another_layout_is_a_miss(tmp_path: Path) -> None:
    storage, _ = await _stored(tmp_path, ["a"])
    await storage.aclose()
    # Same bytes per page, another geometry: only the fingerprint tells them apart.
    other = KVLayout(num_layers=6, num_kv_heads=1, head_dim=16, page_size=4, dtype="bfloat16")
    assert other.bytes_per_page == MHA.bytes_per_page
    async with _open(tmp_path) as reader:
        reader.register_mem_pool_host(filled_pool(other))
        pool = reader.mem_pool_host
        assert pool is not None
        assert await reader.batch_get_v1(["a"], slots(pool, [3])) == [False]
        assert reader.get_stats()["errors"] == {"corrupt": 1}


async def test_misnamed_file_is_a_miss(tmp_path: Path) -> None:
    storage, paths = await _stored(tmp_path, ["a", "b"])
    shutil.copyfile(paths[0], paths[1])
    async with storage:
        pool = storage.mem_pool_host
        assert pool is not None
        assert await storage.batch_get_v1(["b", "a"], slots(pool, [6, 7])) == [False, True]
        assert storage.get_stats()["errors"] == {"corrupt": 1}


async def test_injected_enospc_is_a_failed_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, buffers: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pageio, "_pwritev", full)
    async with _open(tmp_path) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        assert await storage.batch_set_v1(["a", "b"], slots(pool, [0, 1])) == [False, False]
        stats = storage.get_stats()
        assert stats["errors"] == {"nospace": 2}
        assert stats["set_failed"] == 2
        assert await storage.batch_exists(["a"]) == 0
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # no temp files left


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_real_enospc_on_a_full_tmpfs(small_tmpfs: Path) -> None:
    async with _open(small_tmpfs) as storage:
        pool = filled_pool(MHA, pages=64)
        storage.register_mem_pool_host(pool)
        keys = [f"k{i}" for i in range(64)]  # 64 x 1.6 KiB pages in 4 KiB blocks > 64 KiB
        stored = await storage.batch_set_v1(keys, slots(pool, list(range(64))))
        assert not all(stored)
        assert any(stored)
        assert storage.get_stats()["errors"]["nospace"] == stored.count(False)
        # What was stored reads back right; what failed is absent, with no temp file left.
        found = await storage.batch_get_v1(keys[:8], slots(pool, list(range(56, 64))))
        assert found == stored[:8]
        for i, ok in enumerate(found):
            if ok:
                assert page_bytes(pool, 56 + i) == page_bytes(pool, i)
    assert not list(small_tmpfs.rglob("*.tmp"))


async def test_capacity_keeps_recent_pages(tmp_path: Path) -> None:
    page_file = MHA.bytes_per_page + 64
    async with _open(tmp_path, capacity_bytes=3 * page_file) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        await storage.batch_set_v1(["a", "b", "c"], slots(pool, [0, 1, 2]))
        assert await storage.batch_get_v1(["a"], slots(pool, [7])) == [True]  # a is recent
        await storage.batch_set_v1(["d", "e"], slots(pool, [3, 4]))
        assert [await storage.exists(k) for k in "abcde"] == [True, False, False, True, True]
        stats = storage.get_stats()
        assert stats["evicted_pages"] == 2
        assert stats["used_bytes"] == 3 * page_file
    # A new instance rebuilds the index once from the files, and keeps within capacity.
    async with _open(tmp_path, capacity_bytes=2 * page_file) as again:
        again.register_mem_pool_host(pool)
        await again.batch_set_v1(["f"], slots(pool, [5]))
        assert again.get_stats()["indexed_pages"] == 2
        assert sum(1 for _ in tmp_path.rglob("*.kv")) == 2
        assert await again.exists("f")


@pytest.mark.parametrize("fsync", ["file", "dir"])
async def test_fsync_policies_store_pages(tmp_path: Path, fsync: str) -> None:
    async with _open(tmp_path, fsync=fsync) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [True]
        assert await storage.batch_get_v1(["a"], slots(pool, [1])) == [True]


async def test_keys_cannot_escape_the_directory(tmp_path: Path) -> None:
    root = tmp_path / "store"
    async with _open(root) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        keys = ["../../evil", "/etc/passwd", "a/../../b", "\x00nul"]
        assert await storage.batch_set_v1(keys, slots(pool, [0, 1, 2, 3])) == [True] * 4
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 4
    assert all(root in p.parents for p in files)
    assert all(len(p.relative_to(root).parts) == 3 for p in files)


async def test_cancel_midway_stops_between_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every page write takes 20 ms: a batch of 40 pages on 2 threads takes ~0.4 s uncancelled.
    # Counted, not timed (a stalled VM must not fail it): when the cancellation reaches the
    # caller every started write has returned, and no write starts afterwards.
    real = pageio._pwritev
    entered = exited = 0
    loop = asyncio.get_running_loop()
    writing = asyncio.Event()

    def slow(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal entered, exited
        entered += 1
        loop.call_soon_threadsafe(writing.set)
        try:
            time.sleep(0.02)
            return real(fd, buffers, offset)
        finally:
            exited += 1

    monkeypatch.setattr(pageio, "_pwritev", slow)
    n = 40
    async with _open(tmp_path, io_threads=2) as storage:
        pool = filled_pool(MHA, pages=n)
        storage.register_mem_pool_host(pool)
        keys = [f"k{i}" for i in range(n)]
        task = asyncio.ensure_future(storage.batch_set_v1(keys, slots(pool, list(range(n)))))
        await writing.wait()  # cancel once writing is under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert entered == exited  # running pages finished before the caller heard of it
        started = entered
        await asyncio.sleep(0.1)  # five page-times: a leftover worker would start one
        assert entered == started < n  # the rest never started
        stored = [await storage.exists(k) for k in keys]
        assert 0 < sum(stored) <= started  # a page is stored only by a write that ran
        assert not list(tmp_path.rglob("*.tmp"))
        monkeypatch.setattr(pageio, "_pwritev", real)
        dst = filled_pool(MHA, pages=n, seed=9)
        storage.register_mem_pool_host(dst)
        found = await storage.batch_get_v1(keys, slots(dst, list(range(n))))
        assert found == stored
        for i, ok in enumerate(found):
            if ok:
                assert page_bytes(dst, i) == page_bytes(pool, i)
