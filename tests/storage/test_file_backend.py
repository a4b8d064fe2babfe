"""File backend specifics: on-disk faults, capacity, fsync, paths, the segment layout."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import sqlite3
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
PAGE = MHA.bytes_per_page  # 1.5 KiB: below 4 KiB, packed at 64-byte boundaries
PAGE_FILE = PAGE + 64  # what a page counts against the capacity: payload and trailer


def _open(path: Path, **options: object) -> FileStorage:
    storage = create_storage("file", CONFIG, path=path, **options)
    assert isinstance(storage, FileStorage)
    return storage


async def _stored(path: Path, keys: list[str]) -> tuple[FileStorage, list[tuple[str, int, int]]]:
    storage = _open(path)
    storage.register_mem_pool_host(filled_pool(MHA))
    pool = storage.mem_pool_host
    assert pool is not None
    assert all(await storage.batch_set_v1(keys, slots(pool, list(range(len(keys))))))
    places = [storage.locate(k + storage.suffix) for k in keys]
    assert all(p is not None for p in places)
    return storage, [p for p in places if p is not None]


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


def _segment_files(root: Path) -> list[Path]:
    return sorted((root / "segments").glob("*.seg"))


async def test_pages_share_segment_files(tmp_path: Path) -> None:
    storage, places = await _stored(tmp_path, [f"k{i}" for i in range(8)])
    async with storage:
        assert len({p[0] for p in places}) == 1  # one batch, one segment, one write
        assert sorted(p[1] for p in places) == [i * PAGE for i in range(8)]
    assert [p.name for p in _segment_files(tmp_path)] == [Path(places[0][0]).name]
    assert (tmp_path / "index.sqlite3").is_file()


@pytest.mark.parametrize("where", ["payload", "trailer"])
async def test_flipped_byte_is_a_counted_miss(tmp_path: Path, where: str) -> None:
    storage, places = await _stored(tmp_path, ["a"])
    segment, offset, _size = places[0]
    if where == "payload":
        _flip(segment, offset + 100)
    else:  # the trailer lives in the page's index row
        with sqlite3.connect(tmp_path / "index.sqlite3") as db:
            (trailer,) = db.execute("SELECT trailer FROM pages").fetchone()
            bad = bytes([trailer[0] ^ 1]) + trailer[1:]
            db.execute("UPDATE pages SET trailer=?", (bad,))
        await storage.aclose()  # a new instance: it knows of no place but the index's
        storage = _open(tmp_path)
        storage.register_mem_pool_host(filled_pool(MHA))
    async with storage:
        pool = storage.mem_pool_host
        assert pool is not None
        assert await storage.batch_get_v1(["a"], slots(pool, [7])) == [False]
        assert storage.get_stats()["errors"] == {"corrupt": 1}
        # The bad page left the index, so the key can be stored again.
        assert not await storage.exists("a")
        assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [True]
        assert await storage.batch_get_v1(["a"], slots(pool, [7])) == [True]
        assert page_bytes(pool, 7) == page_bytes(pool, 0)


@pytest.mark.parametrize("keep", [0, 10, 1535])
async def test_segment_cut_short_is_a_miss(tmp_path: Path, keep: int) -> None:
    storage, places = await _stored(tmp_path, ["a"])
    segment, offset, _size = places[0]
    os.truncate(segment, offset + keep)
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


async def test_bytes_of_another_page_are_a_miss(tmp_path: Path) -> None:
    storage, places = await _stored(tmp_path, ["a", "b"])
    (seg_a, off_a, size), (seg_b, off_b, _) = places
    with open(seg_a, "rb") as f:
        f.seek(off_a)
        payload = f.read(size)
    with open(seg_b, "r+b") as f:
        f.seek(off_b)
        f.write(payload)
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
    assert sum(p.stat().st_size for p in _segment_files(tmp_path)) == 0  # nothing left


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


async def test_real_enospc_on_a_full_tmpfs(small_tmpfs: Path) -> None:
    async with _open(small_tmpfs) as storage:
        pool = filled_pool(MHA, pages=256)
        storage.register_mem_pool_host(pool)
        keys = [f"k{i}" for i in range(256)]  # 256 pages in 4 KiB blocks: 1 MiB > 512 KiB
        stored: list[bool] = []
        for lo in range(0, 256, 16):
            stored += await storage.batch_set_v1(
                keys[lo : lo + 16], slots(pool, list(range(lo, lo + 16)))
            )
        assert not all(stored)
        assert any(stored)
        assert storage.get_stats()["errors"]["nospace"] == stored.count(False)
        # What was stored reads back right; what failed is absent.
        dst = filled_pool(MHA, pages=256, seed=5)
        storage.register_mem_pool_host(dst)
        found = await storage.batch_get_v1(keys, slots(dst, list(range(256))))
        assert found == stored
        for i, ok in enumerate(found):
            if ok:
                assert page_bytes(dst, i) == page_bytes(pool, i)
        figures = storage.get_stats()
    # No bytes beyond what the index committed stay on the disk.
    on_disk = sum(p.stat().st_size for p in _segment_files(small_tmpfs))
    assert on_disk == stored.count(True) * PAGE
    assert figures["used_bytes"] == stored.count(True) * PAGE_FILE


async def test_capacity_keeps_recent_pages(tmp_path: Path) -> None:
    async with _open(tmp_path, capacity_bytes=3 * PAGE_FILE) as storage:
        pool = filled_pool(MHA)
        storage.register_mem_pool_host(pool)
        await storage.batch_set_v1(["a", "b", "c"], slots(pool, [0, 1, 2]))
        assert await storage.batch_get_v1(["a"], slots(pool, [7])) == [True]  # a is recent
        await storage.batch_set_v1(["d", "e"], slots(pool, [3, 4]))
        assert [await storage.exists(k) for k in "abcde"] == [True, False, False, True, True]
        stats = storage.get_stats()
        assert stats["evicted_pages"] == 2
        assert stats["used_bytes"] == 3 * PAGE_FILE
    # Another instance sees the same index, and keeps the directory within its capacity.
    async with _open(tmp_path, capacity_bytes=2 * PAGE_FILE) as again:
        again.register_mem_pool_host(pool)
        await again.batch_set_v1(["f"], slots(pool, [5]))
        assert again.get_stats()["indexed_pages"] == 2
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
        assert await storage.batch_exists(keys) == 4
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(root in p.parents for p in files)
    assert {p.name for p in files} <= {
        "index.sqlite3",
        "index.sqlite3-wal",
        "index.sqlite3-shm",
    } | {p.name for p in _segment_files(root)}


async def test_small_pages_of_a_batch_are_read_with_few_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real = pageio._preadv

    def counting(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        return real(fd, buffers, offset)

    async with _open(tmp_path) as storage:
        pool = filled_pool(MHA, pages=64)
        storage.register_mem_pool_host(pool)
        keys = [f"k{i}" for i in range(64)]
        assert all(await storage.batch_set_v1(keys, slots(pool, list(range(64)))))
        monkeypatch.setattr(pageio, "_preadv", counting)
        dst = filled_pool(MHA, pages=64, seed=3)
        storage.register_mem_pool_host(dst)
        assert all(await storage.batch_get_v1(keys, slots(dst, list(range(64)))))
        assert calls == 1  # adjacent pages of one segment: one preadv
        assert all(page_bytes(dst, i) == page_bytes(pool, i) for i in range(64))


async def test_cancelled_write_waits_for_its_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each pwritev takes 50 ms. Counted, not timed (a stalled VM must not fail it): when the
    # cancellation reaches the caller the batch's write has returned, and its pages are whole.
    real = pageio._pwritev
    entered = exited = 0
    loop = asyncio.get_running_loop()
    writing = asyncio.Event()

    def slow(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal entered, exited
        entered += 1
        loop.call_soon_threadsafe(writing.set)
        try:
            time.sleep(0.05)
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
        assert entered == exited  # the running write finished before the caller heard of it
        monkeypatch.setattr(pageio, "_pwritev", real)
        stored = [await storage.exists(k) for k in keys]
        dst = filled_pool(MHA, pages=n, seed=9)
        storage.register_mem_pool_host(dst)
        found = await storage.batch_get_v1(keys, slots(dst, list(range(n))))
        assert found == stored
        for i, ok in enumerate(found):
            if ok:
                assert page_bytes(dst, i) == page_bytes(pool, i)


@pytest.mark.parametrize("sizes", [[100], [40 << 10], [1 << 20], [8 << 10] * 12, [3, 70 << 10, 5]])
def test_checksum_without_the_gil_is_the_codecs(sizes: list[int]) -> None:
    from hicache_async.storage.codec import checksum as codec_checksum
    from hicache_file._checksum import FAST, checksum

    assert FAST  # the xxhash extension's symbols are found here
    rng = random.Random(sum(sizes))
    segments = [memoryview(bytearray(rng.randbytes(n))) for n in sizes]
    assert checksum(segments) == codec_checksum(segments)
    read_only = [memoryview(bytes(s)) for s in segments]  # no address to hand over: the module
    assert checksum(read_only) == codec_checksum(segments)
