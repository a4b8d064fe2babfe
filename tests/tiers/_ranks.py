"""Running an async function on several real torch.distributed (gloo) ranks, one process each."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import torch.distributed as dist

RankMain = Callable[[int], Awaitable[dict[str, Any]]]


def _worker(main: RankMain, rank: int, world: int, store: str, out: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out.put((rank, anyio.run(main, rank)))
    finally:
        dist.destroy_process_group()


def run_ranks(main: RankMain, world: int, tmp_path: Path, timeout: float = 120) -> dict[int, Any]:
    """``main(rank)`` on ``world`` spawned processes; their results by rank (``main`` must be a
    module-level function, so the spawned processes can import it)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_worker, args=(main, r, world, store, out)) for r in range(world)]
    for proc in procs:
        proc.start()
    results = dict(out.get(timeout=timeout) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    out.close()
    out.join_thread()
    return results
