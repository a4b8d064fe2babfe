"""The file backend under SIGKILL and beside other writers, in real processes (issue 20).

A writer process stores batches of pages and prints each batch's keys once it is
acknowledged; the test kills it at random instants. Then: every acknowledged page reads back
exact (the writer runs with ``fsync``), no page reads back other than exact (none torn, none
another key's), and once reopened nothing is left on the disk that the index does not hold.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest
import torch

from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_file import FileStorage

ROOT = Path(__file__).resolve().parents[2]
CONFIG = HiCacheStorageConfig(model_name="crash")
PAGE = 64 << 10

# argv: root, writer id, fsync, first key, pages, batch, extra options (JSON)
_WRITER = """
import asyncio, json, sys
import torch
from hicache_async.storage import HiCacheStorageConfig, create_storage

root, writer, fsync = sys.argv[1], int(sys.argv[2]), sys.argv[3]
first, pages, batch = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
options = json.loads(sys.argv[7])
PAGE = 64 << 10

def content(key, writer):
    base = torch.arange(PAGE, dtype=torch.int64) * (key + 7) + writer * 31 + key
    return (base % 251).to(torch.uint8)

async def main():
    storage = create_storage(
        "file", HiCacheStorageConfig(model_name="crash"), path=root, fsync=fsync, **options
    )
    async with storage:
        for lo in range(first, first + pages, batch):
            keys = list(range(lo, min(first + pages, lo + batch)))
            values = [content(k, writer) for k in keys]
            ok = await storage.batch_set([f"k{k}" for k in keys], values)
            if ok:
                print(" ".join(map(str, keys)), flush=True)
    print("done", flush=True)

asyncio.run(main())
"""


def content(key: int, writer: int) -> torch.Tensor:
    base = torch.arange(PAGE, dtype=torch.int64) * (key + 7) + writer * 31 + key
    return (base % 251).to(torch.uint8)


def _writer(
    root: Path,
    writer: int,
    first: int,
    pages: int,
    *,
    batch: int = 8,
    fsync: str = "file",
    **options: object,
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            _WRITER,
            str(root),
            str(writer),
            fsync,
            str(first),
            str(pages),
            str(batch),
            json.dumps(options),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


class _Acks:
    """The keys a writer acknowledged, read from its stdout in a thread."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.keys: list[int] = []
        self.done = False
        self.first = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(proc,))
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "done":
                self.done = True
            else:
                self.keys += [int(k) for k in line.split()]
            self.first.set()
        self.first.set()

    def join(self) -> None:
        self._thread.join()


def _open(root: Path, **options: object) -> FileStorage:
    storage = create_storage("file", CONFIG, path=root, **options)
    assert isinstance(storage, FileStorage)
    return storage


async def _read_all(root: Path, keys: list[int]) -> dict[int, torch.Tensor | None]:
    async with _open(root) as storage:
        outs = [torch.zeros(PAGE, dtype=torch.uint8) for _ in keys]
        got = await storage.batch_get([f"k{k}" for k in keys], outs)
        return dict(zip(keys, got, strict=True))


async def _figures(root: Path, **options: object) -> dict[str, object]:
    async with _open(root, **options) as storage:
        await storage.wait_open()
        return storage.get_stats()


def _leftovers(root: Path) -> list[str]:
    """What the disk holds beyond the index: segment files it does not know, bytes past a
    segment's committed end, segments still marked active (no writer lives now)."""
    problems = []
    with sqlite3.connect(root / "index.sqlite3") as db:
        rows = db.execute("SELECT id, state, end_off FROM segments").fetchall()
    known = {seg: (state, end) for seg, state, end in rows}
    for path in sorted((root / "segments").iterdir()):
        seg = int(path.stem)
        if seg not in known:
            problems.append(f"{path.name}: no index row")
            continue
        state, end = known[seg]
        if state != 1:
            problems.append(f"{path.name}: still active")
        if path.stat().st_size != end:
            problems.append(f"{path.name}: {path.stat().st_size} bytes, committed {end}")
    for seg in known:
        if not (root / "segments" / f"{seg:012d}.seg").exists():
            problems.append(f"segment {seg}: a row without a file")
    return problems


@pytest.mark.timeout(900)  # 24 writer processes, each importing torch
def test_sigkill_at_random_instants(tmp_path: Path) -> None:
    rng = random.Random(20)
    acked: set[int] = set()
    attempted: set[int] = set()
    trials, midway = 24, 0
    for trial in range(trials):
        first = trial * 1000
        proc = _writer(tmp_path, 1, first, 400)
        acks = _Acks(proc)
        acks.first.wait(timeout=120)  # started and writing (or done)
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.wait()
        acks.join()
        assert proc.stdout is not None
        proc.stdout.close()
        acked.update(acks.keys)
        midway += not acks.done
        attempted.update(range(first, first + 400))
        # Every acknowledged page, and any other page found, is exact.
        found = anyio.run(_read_all, tmp_path, sorted(attempted))
        lost = [k for k in acked if found[k] is None]
        assert lost == [], f"trial {trial}: acknowledged pages lost: {lost[:10]}"
        for key, page in found.items():
            if page is not None:
                assert torch.equal(page, content(key, 1)), f"trial {trial}: page {key} is wrong"
        assert _leftovers(tmp_path) == [], f"trial {trial}"
    assert len(acked) > 0
    assert midway >= trials // 2  # most kills hit a writer in the middle of its batches
    assert anyio.run(_figures, tmp_path)["indexed_pages"] >= len(acked)


def test_two_writers_of_the_same_keys_leave_whole_pages(tmp_path: Path) -> None:
    procs = [_writer(tmp_path, w, 0, 256, batch=4) for w in (1, 2)]
    acks = [_Acks(p) for p in procs]
    for proc, ack in zip(procs, acks, strict=True):
        assert proc.wait(timeout=300) == 0
        ack.join()
        assert ack.done
        assert proc.stdout is not None
        proc.stdout.close()
    found = anyio.run(_read_all, tmp_path, list(range(256)))
    whose = []
    for key, page in found.items():
        assert page is not None, key
        if torch.equal(page, content(key, 1)):
            whose.append(1)
        else:
            assert torch.equal(page, content(key, 2)), f"page {key} is neither writer's"
            whose.append(2)
    assert _leftovers(tmp_path) == []
    assert anyio.run(_figures, tmp_path)["indexed_pages"] == 256  # one copy of each key
    # The losing copies' blocks were freed: the segments hold about one copy of each page.
    allocated = sum(p.stat().st_blocks * 512 for p in (tmp_path / "segments").iterdir())
    assert allocated <= 256 * PAGE + 64 * 4096


def test_capacity_holds_across_processes(tmp_path: Path) -> None:
    capacity = 40 * (PAGE + 64)
    procs = [
        _writer(tmp_path, w, w * 1000, 120, batch=4, fsync="none", capacity_bytes=capacity)
        for w in (1, 2, 3)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
        assert proc.stdout is not None
        proc.stdout.close()
    stats = anyio.run(_figures, tmp_path)
    assert isinstance(stats["used_bytes"], int)
    assert isinstance(stats["indexed_pages"], int)
    assert stats["used_bytes"] <= capacity
    assert 0 < stats["indexed_pages"] <= 40
    allocated = sum(p.stat().st_blocks * 512 for p in (tmp_path / "segments").iterdir())
    assert allocated <= capacity + 3 * 4096  # evicted pages' blocks were freed
    assert _leftovers(tmp_path) == []
    # Recent pages of every writer survived: the LRU is the directory's, not one process's.
    keys = [w * 1000 + k for w in (1, 2, 3) for k in range(120)]
    found = anyio.run(_read_all, tmp_path, keys)
    assert sum(p is not None for p in found.values()) == stats["indexed_pages"]
    for key, page in found.items():
        if page is not None:
            assert torch.equal(page, content(key, key // 1000))


def test_writer_killed_with_a_batch_half_written_leaves_nothing(tmp_path: Path) -> None:
    # A big batch (8 MiB) killed as early as it can be: its bytes may be on the disk, but
    # they are never indexed, and the next process cuts them off.
    proc = _writer(tmp_path, 1, 0, 128, batch=128)
    segments = tmp_path / "segments"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if segments.is_dir() and any(p.stat().st_size for p in segments.iterdir()):
            break  # its pwritev has begun
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    anyio.run(_figures, tmp_path)
    assert _leftovers(tmp_path) == []
    assert os.path.isdir(tmp_path / "segments")
