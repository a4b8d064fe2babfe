"""File backend repair: leftovers of killed writers, pages removed or replaced from outside,
non-regular files in a page's place, and paths or sizes that cannot work (issue 17)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.errors import ConfigError
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.storage import MHA, filled_pool, page_bytes, slots
from hicache_file import FileStorage

T = TypeVar("T")
CONFIG = HiCacheStorageConfig(model_name="m")
PAGE_FILE = MHA.bytes_per_page + 64  # payload + trailer

# A writer that stalls in the middle of a page write (its temp file written, not yet renamed)
# until its stdin closes: the test kills it there, or lets it finish.
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


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _open(path: Path, **options: object) -> FileStorage:
    storage = create_storage("file", CONFIG, path=path, **options)
    assert isinstance(storage, FileStorage)
    storage.register_mem_pool_host(filled_pool(MHA))
    return storage


def _pool(storage: FileStorage) -> HostKVPool:
    pool = storage.mem_pool_host
    assert pool is not None
    return pool


async def _surveyed(path: Path, **options: object) -> dict[str, object]:
    """Open a store, let its survey run (the first call starts it, in the background); the
    stats once it is closed."""
    async with _open(path, **options) as storage:
        await storage.exists("anything")
        await storage.wait_survey()
    return storage.get_stats()


def _temps(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


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


def _kill_writers(root: Path, count: int) -> None:
    """Leave the temp files of ``count`` writers killed in the middle of a page write (all
    alive at once until then: each writer's own survey keeps the others' files)."""
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(_stalled_writer(root, f"k{i}")) for i in range(count)]
        for proc in procs:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


# -- defect 8: temp files of killed writers ----------------------------------------------


def test_killed_writers_temp_files_are_swept_at_open(tmp_path: Path) -> None:
    _kill_writers(tmp_path, 3)
    left = _temps(tmp_path)
    assert len(left) == 3
    stats = _run(_surveyed(tmp_path))
    assert _temps(tmp_path) == []
    assert stats["swept_temp_files"] == 3
    assert stats["swept_temp_bytes"] == 3 * PAGE_FILE


def test_live_writers_temp_file_is_left_alone(tmp_path: Path) -> None:
    with _stalled_writer(tmp_path, "live") as proc:
        # The temp name carries the owner's pid: this one is alive, so its file stays.
        (temp,) = _temps(tmp_path)
        assert f".{proc.pid}." in temp.name
        stats = _run(_surveyed(tmp_path))
        assert stats["swept_temp_files"] == 0
        assert _temps(tmp_path) == [temp]
        assert proc.stdin is not None
        proc.stdin.close()  # let it finish: its rename finds its temp file
        assert proc.wait() == 0
    assert _temps(tmp_path) == []
    stats = _run(_read_stats(tmp_path, "live"))
    assert stats["get_hits"] == 1


async def _read_stats(path: Path, key: str) -> dict[str, object]:
    async with _open(path) as storage:
        assert await storage.batch_get_v1([key], slots(_pool(storage), [3])) == [True]
    return storage.get_stats()


def test_writer_killed_while_another_lives(tmp_path: Path) -> None:
    with _stalled_writer(tmp_path, "dead") as dead, _stalled_writer(tmp_path, "live") as live:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        assert len(_temps(tmp_path)) == 2
        stats = anyio.run(_surveyed, tmp_path, backend="trio")  # the survey on trio too
        assert stats["swept_temp_files"] == 1
        (kept,) = _temps(tmp_path)
        assert f".{live.pid}." in kept.name


def test_temp_files_of_unknown_owners_are_swept_by_age(tmp_path: Path) -> None:
    shard = tmp_path / "ab" / "cd"
    shard.mkdir(parents=True)
    digest = "abcd" + "0" * 28
    names = [
        f"{digest}.kv.0a1b2c3d.1.deadbeef.77.tmp",  # another host: its pid means nothing here
        f"{digest}.kv.deadbeef.{os.getpid()}.77.tmp",  # the older name format
        f"{digest}.kv.garbage.tmp",
    ]
    for name in names:
        (shard / name).write_bytes(b"x" * 100)
    assert _run(_surveyed(tmp_path))["swept_temp_files"] == 0
    assert len(_temps(tmp_path)) == 3  # recent: a writer elsewhere may still own them
    # Not a temp name of ours: a ``path`` shared with other files loses none of them.
    foreign = [shard / "notes.tmp", tmp_path / f"{digest}.kv.x.tmp", shard / f"{digest}.tmp"]
    for path in foreign:
        path.write_bytes(b"z")
    old = time.time() - 2 * 3600
    for path in [*(shard / name for name in names), *foreign]:
        os.utime(path, (old, old))
    stats = _run(_surveyed(tmp_path))
    assert stats["swept_temp_files"] == 3
    assert stats["swept_temp_bytes"] == 300
    assert _temps(tmp_path) == sorted(foreign)


async def test_this_process_keeps_its_own_writers_temp_files(tmp_path: Path) -> None:
    # A temp name with this process's pid is a live writer's when it also carries this
    # process's token, a dead process's that had the same pid (a restarted container) if not.
    from hicache_file._tempfiles import temp_path

    async with _open(tmp_path) as writer:
        assert await writer.batch_set_v1(["a"], slots(_pool(writer), [0])) == [True]
        page = writer.path_of("a" + writer.suffix)
    ours = Path(temp_path(page))
    parts = ours.name.split(".")
    assert parts[3] == str(os.getpid())
    parts[4] = "0" * len(parts[4]) if set(parts[4]) != {"0"} else "1" * len(parts[4])
    stale = ours.with_name(".".join(parts))
    ours.write_bytes(b"x")
    stale.write_bytes(b"yy")
    stats = await _surveyed(tmp_path)
    assert stats["swept_temp_files"] == 1
    assert stats["swept_temp_bytes"] == 2
    assert _temps(tmp_path) == [ours]


def test_capacity_holds_once_leftovers_are_swept(tmp_path: Path) -> None:
    _kill_writers(tmp_path, 3)

    async def fill() -> dict[str, object]:
        async with _open(tmp_path, capacity_bytes=4 * PAGE_FILE) as storage:
            await storage.wait_survey()
            keys = [f"p{i}" for i in range(6)]
            assert all(await storage.batch_set_v1(keys, slots(_pool(storage), list(range(6)))))
        return storage.get_stats()

    stats = _run(fill())
    on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert on_disk == stats["used_bytes"] == 4 * PAGE_FILE
    assert stats["swept_temp_files"] == 3


# -- defect 8: the capacity index against the disk ---------------------------------------


async def test_index_forgets_pages_deleted_from_outside(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(8)]
    async with _open(tmp_path, capacity_bytes=100 * PAGE_FILE) as storage:
        pool = _pool(storage)
        assert all(await storage.batch_set_v1(keys, slots(pool, list(range(8)))))
        assert storage.get_stats()["used_bytes"] == 8 * PAGE_FILE
        for key in keys[:5]:
            os.unlink(storage.path_of(key + storage.suffix))
        # A read that finds two gone, and an exists that finds the first of the rest gone.
        found = await storage.batch_get_v1(keys[:2] + keys[7:], slots(pool, [0, 1, 2]))
        assert found == [False, False, True]
        assert await storage.batch_exists(keys[2:3]) == 0
        assert await storage.batch_exists(keys[3:]) == 0
        assert await storage.batch_exists(keys[4:]) == 0
        stats = storage.get_stats()
        on_disk = sum(p.stat().st_size for p in tmp_path.rglob("*.kv"))
        assert stats["used_bytes"] == on_disk == 3 * PAGE_FILE
        assert stats["indexed_pages"] == 3
        assert stats["error_count"] == 0  # a page gone is a plain miss


async def test_reopened_index_counts_the_disk(tmp_path: Path) -> None:
    keys = [f"k{i}" for i in range(8)]
    async with _open(tmp_path, capacity_bytes=100 * PAGE_FILE) as storage:
        assert all(await storage.batch_set_v1(keys, slots(_pool(storage), list(range(8)))))
        paths = [storage.path_of(k + storage.suffix) for k in keys]
    for path in paths[:5]:
        os.unlink(path)
    async with _open(tmp_path, capacity_bytes=100 * PAGE_FILE) as again:
        await again.wait_survey()
        stats = again.get_stats()
        assert stats["used_bytes"] == 3 * PAGE_FILE
        assert stats["indexed_pages"] == 3


# -- defect 8 / defect 3: something else in a page's place -------------------------------


def _replace(path: str, kind: str, outside: Path) -> None:
    os.unlink(path)
    if kind == "directory":
        os.mkdir(path)
        (Path(path) / "inner").write_bytes(b"x")
    elif kind == "fifo":
        os.mkfifo(path)
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


KINDS = ["directory", "fifo", "symlink-to-fifo", "symlink-to-directory", "symlink-to-char-device"]


@pytest.mark.parametrize("kind", KINDS)
async def test_non_file_in_a_page_place_misses_that_page_only(tmp_path: Path, kind: str) -> None:
    store, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    async with _open(store) as storage:
        pool = _pool(storage)
        assert all(await storage.batch_set_v1(["a", "b", "c"], slots(pool, [0, 1, 2])))
        bad = storage.path_of("b" + storage.suffix)
        _replace(bad, kind, outside)
        try:
            found = await storage.batch_get_v1(["a", "b", "c"], slots(pool, [5, 6, 7]))
        finally:
            _unblock(bad)
        assert found == [True, False, True]
        stats = storage.get_stats()
        assert stats["errors"] == {"corrupt": 1}
        assert stats["repaired_entries"] == 1
        assert page_bytes(pool, 5) == page_bytes(pool, 0)
        assert page_bytes(pool, 7) == page_bytes(pool, 2)
        # Repaired: the entry is gone (a link, not what it points to), the page writes again.
        assert not os.path.lexists(bad)
        assert await storage.batch_set_v1(["b"], slots(pool, [1])) == [True]
        assert storage.get_stats()["set_skipped"] == 0
        assert await storage.batch_get_v1(["b"], slots(pool, [6])) == [True]
        assert page_bytes(pool, 6) == page_bytes(pool, 1)
    assert (
        sorted(p.name for p in outside.rglob("*"))
        == {
            "directory": [],
            "fifo": [],
            "symlink-to-fifo": ["fifo"],
            "symlink-to-directory": ["dir", "keep"],
            "symlink-to-char-device": [],
        }[kind]
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_write_over_a_non_file_stores_the_page(tmp_path: Path, kind: str) -> None:
    store, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    async with _open(store) as storage:
        pool = _pool(storage)
        assert await storage.batch_set_v1(["b"], slots(pool, [1])) == [True]
        bad = storage.path_of("b" + storage.suffix)
        _replace(bad, kind, outside)
        assert await storage.batch_exists(["b"]) == 0  # not a page
        try:
            assert await storage.batch_set_v1(["b"], slots(pool, [1])) == [True]
            assert await storage.batch_exists(["b"]) == 1
            assert await storage.batch_get_v1(["b"], slots(pool, [6])) == [True]
        finally:
            _unblock(bad)
        assert page_bytes(pool, 6) == page_bytes(pool, 1)
        stats = storage.get_stats()
        assert stats["set_skipped"] == 0
        assert stats["repaired_entries"] == 1
        assert stats["error_count"] == 0


async def test_file_in_a_shard_directory_place(tmp_path: Path) -> None:
    async with _open(tmp_path) as storage:
        pool = _pool(storage)
        assert all(await storage.batch_set_v1(["a", "b"], slots(pool, [0, 1])))
        bad = Path(storage.path_of("b" + storage.suffix))
        if bad.parent == Path(storage.path_of("a" + storage.suffix)).parent:
            pytest.skip("both keys share a shard directory")
        for child in bad.parent.iterdir():
            child.unlink()
        bad.parent.rmdir()
        bad.parent.write_bytes(b"not a directory")
        found = await storage.batch_get_v1(["a", "b"], slots(pool, [5, 6]))
        assert found == [True, False]
        assert await storage.batch_set_v1(["b"], slots(pool, [1])) == [True]
        assert await storage.batch_get_v1(["b"], slots(pool, [6])) == [True]
        assert page_bytes(pool, 6) == page_bytes(pool, 1)
        assert storage.get_stats()["repaired_entries"] == 1


def _cache_config(path: Path) -> HiCacheConfig:
    # model_name becomes a required field for a shared L3 (issue 17, defect 7).
    named = {"model_name": "test"} if "model_name" in HiCacheConfig.model_fields else {}
    return HiCacheConfig(
        layout=KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", page_size=4),
        **named,
        device="cpu",
        device_pages=16,
        host_pages=32,
        storage_backend="file",
        storage_backend_extra_config=json.dumps({"path": str(path)}),
        prefetch_threshold=4,
        prefetch_policy="wait_complete",
    )


async def test_fifos_in_page_places_through_the_cache(tmp_path: Path) -> None:
    await _fifos_through_the_cache(tmp_path)


def test_fifos_in_page_places_through_the_cache_on_trio(tmp_path: Path) -> None:
    anyio.run(_fifos_through_the_cache, tmp_path, backend="trio")


async def _fifos_through_the_cache(tmp_path: Path) -> None:
    # Defect 3: a FIFO where a page file was hung the request and the cache's close.
    from tests.test_cache_e2e import serve

    prompt = torch.arange(7, 7 + 48)
    async with HiCache.open(_cache_config(tmp_path)) as cache:
        assert await serve(cache, prompt) == 0
    pages = sorted(tmp_path.rglob("*.kv"))
    assert pages
    for page in pages:
        page.unlink()
        os.mkfifo(page)
    try:
        async with HiCache.open(_cache_config(tmp_path)) as cache:
            assert await serve(cache, prompt) == 0  # every page a miss; the request ends
    finally:
        for page in pages:
            _unblock(str(page))
    # The second cache wrote the pages again over the FIFOs; a third one hits them all.
    assert all(page.is_file() for page in pages)
    async with HiCache.open(_cache_config(tmp_path)) as cache:
        assert await serve(cache, prompt) == 48


# -- defect 9: paths and sizes that cannot work ------------------------------------------


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
