"""Rank consensus over real torch.distributed (gloo) processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from hicache_async.errors import ConfigError
from hicache_async.tiers.consensus import RankConsensus
from tests.tiers._ranks import run_ranks

WORLD = 2


async def _rank_main(rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    consensus = RankConsensus()
    # Start together: spawned ranks come up up to ~0.5 s apart on a busy machine, which would
    # eat the 0.5 s rank 0 is meant to wait below (a blocking barrier, before the timed part).
    dist.barrier()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        if rank == 1:
            await anyio.sleep(0.5)  # rank 0 waits in the collective meanwhile
        start_ticks = ticks
        first = await consensus.agree_min([10 + rank, 5 - rank, 7])
        waited_ticks = ticks - start_ticks
        idle = await consensus.agree(0 if rank == 0 else 3)  # a rank with nothing still joins
        many = [await consensus.agree(rank * 100 + i) for i in range(20)]
        tg.cancel_scope.cancel()
    return {
        "first": first,
        "idle": idle,
        "many": many,
        "waited_ticks": waited_ticks,
        "rounds": consensus.rounds,
    }


@pytest.mark.timeout(120)
def test_two_gloo_ranks_agree_on_the_minimum_without_blocking_the_loop(tmp_path: Path) -> None:
    results = run_ranks(_rank_main, WORLD, tmp_path)
    for rank in range(WORLD):
        got = results[rank]
        assert got["first"] == [10, 4, 7]
        assert got["idle"] == 0
        assert got["many"] == list(range(20))
        assert got["rounds"] == 22
    # Rank 0 waited ~0.5 s for rank 1 inside the collective; its loop kept ticking meanwhile.
    assert results[0]["waited_ticks"] >= 10


def test_needs_an_initialised_group() -> None:
    with pytest.raises(ConfigError, match=r"needs torch\.distributed initialised first"):
        RankConsensus()
