"""File backend repair: what killed writers leave, segments removed or replaced from outside,
stores of the old one-file-a-page layout, and paths or sizes that cannot work (issue 17, 20)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.errors import ConfigError
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.storage.codec import key_digest
from hicache_async.testing.storage import MHA, filled_pool, page_bytes, slots
from hicache_file import FileStorage

CONFIG = HiCacheStorageConfig(model_name="m")
PAGE = MHA.bytes_per_page
PAGE_FILE = PAGE + 64  # what a page counts against the capacity: payload and trailer

# A writer that stalls in the middle of a batch (its bytes written, not yet indexed) until its
# stdin closes: the test kills it there, or lets it finish.
_WRITER = """
import asyncio, sys
import hicache_file._pageio as pageio
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.storage import MHA, filled_pool, slots

real = pageio._pwritev

def stall(fd, buffers, offset):
    done = real(fd, buffers, offset)
    print("writing", flush=True)
    sys.stdin.read()
    return done

pageio._pwritev = stall

async def main():
    storage = create_storage(
        "file", HiCacheStorageConfig(model_name="m"), path=sys.argv[1], io_threads=1
    )
    storage.register_mem_pool_host(filled_pool(MHA))
    async with storage:
        assert await storage.batch_set_v1([sys.argv[2]], slots(storage.mem_pool_host, [0]))

asyncio.run(main())
"""


def _open(path: Path, **options: object) -> FileStorage:
    storage = create_storage("file", CONFIG, path=path, **options)
    assert isinstance(storage, FileStorage)
    storage.register_mem_pool_host(filled_pool(MHA))
    return storage


def _pool(storage: FileStorage) -> HostKVPool:
    pool = storage.mem_pool_host
    assert pool is not None
    return pool


def _segments(root: Path) -> list[Path]:
    return sorted((root / "segments").glob("*.seg"))


@contextlib.contextmanager
def _stalled_writer(root: Path, key: str) -> Iterator[subprocess.Popen[str]]:
    """A writer process stalled in the middle of writing ``key``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(root), key],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "writing\n"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


async def _stats_after_open(root: Path) -> dict[str, object]:
    async with _open(root) as storage:
        await storage.wait_open()
        return storage.get_stats()


# -- what killed writers leave -----------------------------------------------------------


async def test_killed_writers_bytes_are_cut_at_open(tmp_path: Path) -> None:
    with _stalled_writer(tmp_path, "k") as proc:
        assert [p.stat().st_size for p in _segments(tmp_path)] == [PAGE]  # written, unindexed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stats = await _stats_after_open(tmp_path)
    assert stats["segments_reclaimed"] == 1
    assert stats["bytes_cut"] == PAGE
    assert stats["indexed_pages"] == 0
    assert _segments(tmp_path) == []  # nothing of it was committed: the file is gone
    async with _open(tmp_path) as storage:
        assert not await storage.exists("k")


async def test_live_writers_segment_is_left_alone(tmp_path: Path) -> None:
    with _stalled_writer(tmp_path, "k") as proc:
        stats = await _stats_after_open(tmp_path)
        assert stats["segments_reclaimed"] == 0
        assert [p.stat().st_size for p in _segments(tmp_path)] == [PAGE]
        assert proc.stdin is not None
        proc.stdin.close()  # let it finish its batch
        assert proc.wait() == 0
    async with _open(tmp_path) as storage:
        pool = _pool(storage)
        assert await storage.batch_get_v1(["k"], slots(pool, [5])) == [True]
        assert page_bytes(pool, 5) == page_bytes(pool, 0)


async def test_writer_killed_while_another_lives(tmp_path: Path) -> None:
    with _stalled_writer(tmp_path, "a") as live, _stalled_writer(tmp_path, "b") as dead:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        stats = await _stats_after_open(tmp_path)
        assert stats["segments_reclaimed"] == 1
        assert len(_segments(tmp_path)) == 1  # the live writer's
        assert live.stdin is not None
        live.stdin.close()
        assert live.wait() == 0
    async with _open(tmp_path) as storage:
        assert await storage.batch_exists(["a", "b"]) == 1


async def test_segment_file_without_an_index_row_is_removed(tmp_path: Path) -> None:
    async with _open(tmp_path) as storage:
        await storage.wait_open()
    stray = tmp_path / "segments" / f"{999:012d}.seg"
    stray.write_bytes(b"x" * 100)
    other = tmp_path / "segments" / "notes.txt"  # not a name of ours: kept
    other.write_text("keep")
    stats = await _stats_after_open(tmp_path)
    assert stats["orphan_files_removed"] == 1
    assert not stray.exists()
    assert other.exists()


# -- segments removed or replaced from outside -------------------------------------------


async def _three_segments(root: Path) -> list[str]:
    # Each instance appends to a segment of its own: a, b and c in three files.
    places = []
    for i, key in enumerate("abc"):
        async with _open(root) as storage:
            assert await storage.batch_set_v1([key], slots(_pool(storage), [i])) == [True]
            place = storage.locate(key + storage.suffix)
            assert place is not None
            places.append(place[0])
    assert len(set(places)) == 3
    return places


async def test_segment_removed_from_outside_is_a_plain_miss(tmp_path: Path) -> None:
    segs = await _three_segments(tmp_path)
    os.unlink(segs[1])
    async with _open(tmp_path) as storage:
        pool = _pool(storage)
        assert await storage.batch_get_v1(["a", "b", "c"], slots(pool, [5, 6, 7])) == [
            True,
            False,
            True,
        ]
        stats = storage.get_stats()
        assert stats["error_count"] == 0
        assert stats["indexed_pages"] == 2  # the index forgot the gone segment's pages
        assert not await storage.exists("b")
        assert await storage.batch_set_v1(["b"], slots(pool, [1])) == [True]
        assert await storage.batch_get_v1(["b"], slots(pool, [6])) == [True]
        assert page_bytes(pool, 6) == page_bytes(pool, 1)


def _replace(path: str, kind: str, outside: Path) -> None:
    os.unlink(path)
    if kind == "directory":
        os.mkdir(path)
        (Path(path) / "inside").write_bytes(b"x")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(path)
    elif kind == "symlink-to-fifo":
        os.mkfifo(outside / "fifo")
        os.symlink(outside / "fifo", path)
    elif kind == "symlink-to-directory":
        (outside / "dir").mkdir()
        (outside / "dir" / "keep").write_bytes(b"x")
        os.symlink(outside / "dir", path)
    elif kind == "symlink-to-char-device":
        os.symlink("/dev/zero", path)
    else:
        raise AssertionError(kind)


def _unblock(path: str) -> None:
    # Should a read block on a FIFO after all, a writer end lets it return (the test fails
    # on its assertions instead of hanging the run).
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


KINDS = [
    "directory",
    "fifo",
    "socket",
    "symlink-to-fifo",
    "symlink-to-directory",
    "symlink-to-char-device",
]


@pytest.mark.parametrize("kind", KINDS)
async def test_non_file_in_a_segment_place_misses_its_pages_only(tmp_path: Path, kind: str) -> None:
    store, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    segs = await _three_segments(store)
    _replace(segs[1], kind, outside)
    async with _open(store) as storage:
        pool = _pool(storage)
        try:
            found = await storage.batch_get_v1(["a", "b", "c"], slots(pool, [5, 6, 7]))
        finally:
            _unblock(segs[1])
        assert found == [True, False, True]
        stats = storage.get_stats()
        assert stats["errors"] == {"corrupt": 1}
        assert stats["repaired_entries"] == 1
        assert page_bytes(pool, 5) == page_bytes(pool, 0)
        assert page_bytes(pool, 7) == page_bytes(pool, 2)
        # Repaired: the entry is gone (a link, not what it points to), the page writes again.
        assert not os.path.lexists(segs[1])
        assert not await storage.exists("b")
        assert await storage.batch_set_v1(["b"], slots(pool, [1])) == [True]
        assert await storage.batch_get_v1(["b"], slots(pool, [6])) == [True]
        assert page_bytes(pool, 6) == page_bytes(pool, 1)
    assert (
        sorted(p.name for p in outside.rglob("*"))
        == {
            "directory": [],
            "fifo": [],
            "socket": [],
            "symlink-to-fifo": ["fifo"],
            "symlink-to-directory": ["dir", "keep"],
            "symlink-to-char-device": [],
        }[kind]
    )


def _cache_config(path: Path) -> HiCacheConfig:
    return HiCacheConfig(
        layout=KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", page_size=4),
        model_name="test",
        device="cpu",
        device_pages=16,
        host_pages=32,
        storage_backend="file",
        storage_backend_extra_config=json.dumps({"path": str(path)}),
        prefetch_threshold=4,
        prefetch_policy="wait_complete",
    )


async def test_fifos_in_segment_places_through_the_cache(tmp_path: Path) -> None:
    await _fifos_through_the_cache(tmp_path)


def test_fifos_in_segment_places_through_the_cache_on_trio(tmp_path: Path) -> None:
    anyio.run(_fifos_through_the_cache, tmp_path, backend="trio")


async def _fifos_through_the_cache(tmp_path: Path) -> None:
    # A FIFO where a segment file was must not hang the request or the cache's close.
    from tests.test_cache_e2e import serve

    prompt = torch.arange(7, 7 + 48)
    async with HiCache.open(_cache_config(tmp_path)) as cache:
        assert await serve(cache, prompt) == 0
    segs = _segments(tmp_path)
    assert segs
    for seg in segs:
        seg.unlink()
        os.mkfifo(seg)
    try:
        async with HiCache.open(_cache_config(tmp_path)) as cache:
            assert await serve(cache, prompt) == 0  # every page a miss; the request ends
    finally:
        for seg in segs:
            _unblock(str(seg))
    # The second cache wrote the pages again; a third one hits them all.
    async with HiCache.open(_cache_config(tmp_path)) as cache:
        assert await serve(cache, prompt) == 48


# -- the old layout: one file a page ------------------------------------------------------


def _write_legacy_page(root: Path, storage: FileStorage, key: str, page: int) -> Path:
    # What the one-file-a-page backend wrote: the payload, then the 64-byte trailer.
    pool = _pool(storage)
    name = key + storage.suffix
    digest = key_digest(name)
    d = digest.hex()
    path = root / d[:2] / d[2:4] / f"{d}.kv"
    path.parent.mkdir(parents=True, exist_ok=True)
    segments = pool.page_segments(page)
    path.write_bytes(b"".join(bytes(s) for s in segments) + storage.codec.trailer(digest, segments))
    return path


async def test_pages_of_the_old_layout_stay_readable(tmp_path: Path) -> None:
    async with _open(tmp_path) as storage:
        old = [_write_legacy_page(tmp_path, storage, k, i) for i, k in enumerate(["a", "b"])]
    async with _open(tmp_path) as storage:
        pool = _pool(storage)
        assert storage.get_stats()["legacy_layout"] is False  # not opened yet
        assert await storage.batch_exists(["a", "b", "c"]) == 2
        assert storage.get_stats()["legacy_layout"] is True
        assert await storage.batch_get_v1(["b", "a", "c"], slots(pool, [5, 6, 7])) == [
            True,
            True,
            False,
        ]
        assert page_bytes(pool, 5) == page_bytes(pool, 1)
        assert page_bytes(pool, 6) == page_bytes(pool, 0)
        # Pages are written to segments only, an old page too (its file is left as it is).
        assert await storage.batch_set_v1(["a", "c"], slots(pool, [0, 2])) == [True, True]
        assert storage.locate("a" + storage.suffix) is not None
        assert old[0].exists()
        await storage.clear()
        assert not any(p.exists() for p in old)
        assert await storage.batch_exists(["a"]) == 0
        assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["segments"]


async def test_corrupt_page_of_the_old_layout_is_a_counted_miss(tmp_path: Path) -> None:
    async with _open(tmp_path) as storage:
        path = _write_legacy_page(tmp_path, storage, "a", 0)
    with open(path, "r+b") as f:
        f.seek(10)
        f.write(b"\xff\xfe")
    async with _open(tmp_path) as storage:
        assert await storage.batch_get_v1(["a"], slots(_pool(storage), [5])) == [False]
        assert storage.get_stats()["errors"] == {"corrupt": 1}
        assert not path.exists()


# -- paths and sizes that cannot work ------------------------------------------------------


def _config_error(path: object, **options: object) -> str:
    with pytest.raises(ConfigError) as info:
        create_storage("file", CONFIG, path=path, **options)
    message = str(info.value)
    assert "path" in message
    assert "HICACHE_STORAGE_BACKEND_EXTRA_CONFIG" in message
    return message


def test_path_that_is_a_regular_file(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_bytes(b"")
    assert "regular file" in _config_error(file)


def test_path_under_a_regular_file(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_bytes(b"")
    assert "not a directory" in _config_error(file / "store")


def test_path_that_cannot_be_created() -> None:
    assert "cannot be created" in _config_error("/proc/hicache-async-store")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_path_without_permission(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert "permission" in _config_error(locked / "store").lower()
    finally:
        locked.chmod(0o700)


def test_bad_path_through_the_cache_config(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"regular file.*HICACHE_STORAGE_BACKEND_EXTRA_CONFIG"):
        HiCache(_cache_config(file))


@pytest.mark.parametrize("capacity", [True, 2**70, -5])
def test_nonsense_capacity(tmp_path: Path, capacity: object) -> None:
    with pytest.raises(ConfigError, match="capacity_bytes"):
        create_storage("file", CONFIG, path=tmp_path, capacity_bytes=capacity)


def test_capacity_below_one_page(tmp_path: Path) -> None:
    storage = create_storage("file", CONFIG, path=tmp_path, capacity_bytes=PAGE_FILE - 1)
    with pytest.raises(ConfigError, match=rf"capacity_bytes.*{PAGE_FILE}"):
        storage.register_mem_pool_host(filled_pool(MHA))


async def test_an_index_that_is_no_database_is_set_aside(tmp_path: Path) -> None:
    await _three_segments(tmp_path)
    (tmp_path / "index.sqlite3").write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    async with _open(tmp_path) as storage:
        pool = _pool(storage)
        assert await storage.batch_get_v1(["a", "b"], slots(pool, [5, 6])) == [False, False]
        stats = storage.get_stats()
        assert stats["index_reset"] is True
        assert stats["orphan_files_removed"] == 3  # its segments were no one's any more
        assert await storage.batch_set_v1(["a"], slots(pool, [0])) == [True]
        assert await storage.batch_get_v1(["a"], slots(pool, [5])) == [True]
    assert (tmp_path / "index.sqlite3.corrupt").exists()
