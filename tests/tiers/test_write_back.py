from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
import torch

from hicache_async.events import BlockStored, StorageMedium
from hicache_async.radix import RadixKey, TreeNode
from hicache_async.tiers.write_back import WriteBack

from .conftest import LAYOUT, Rig


def host_node(rig: Rig, tokens: list[int], value: int) -> tuple[RadixKey, torch.Tensor]:
    key = RadixKey(tokens)
    slots = rig.host.reserve(len(tokens) // LAYOUT.page_size)
    assert slots is not None
    rig.fill(slots, value)
    rig.tree.insert_host(key, slots)
    return key, slots


async def test_written_pages_are_in_l3_with_events_and_locks_released(rig: Rig) -> None:
    key, slots = host_node(rig, list(range(16)), value=10)
    node = rig.tree.match_prefix(key).last_host_node
    wb = WriteBack(rig.tree, rig.storage, rig.counters, rig.hub, medium=StorageMedium.EXTERNAL)
    async with anyio.create_task_group() as tg:
        tg.start_soon(wb.run)
        assert wb.submit(node)
        assert node.host_lock_ref == 1  # the pages stay on L2 while the write reads them
        assert rig.tree.evict_host(4).num_pages == 0
        wb.close()
    assert node.host_lock_ref == 0
    keys = rig.tree.page_hashes(node)
    assert await rig.storage.batch_exists(keys) == 4
    batch = await rig.events.receive()
    (event,) = batch.events
    assert isinstance(event, BlockStored)
    assert event.medium is StorageMedium.EXTERNAL
    assert event.block_hashes == tuple(keys)
    assert event.token_ids == tuple(range(16))
    # Read back into other host pages: the bytes are what was written.
    other = rig.host.reserve(4)
    assert other is not None
    assert all(await rig.storage.batch_get_v1(keys, other))
    assert rig.page_bytes(other) == rig.page_bytes(slots)
    rig.host.free(other)


async def test_full_queue_drops_and_unlocks(rig: Rig) -> None:
    wb = WriteBack(
        rig.tree, rig.storage, rig.counters, rig.hub, medium=StorageMedium.DISK, max_jobs=1
    )
    first = rig.tree.match_prefix(host_node(rig, [1, 2, 3, 4], 1)[0]).last_host_node
    second = rig.tree.match_prefix(host_node(rig, [5, 6, 7, 8], 2)[0]).last_host_node
    assert wb.submit(first)
    assert not wb.submit(second)  # nobody drains yet: the bounded queue is full
    assert (wb.dropped, second.host_lock_ref, first.host_lock_ref) == (1, 0, 1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(wb.run)
        wb.close()
    assert first.host_lock_ref == 0


async def release_one_job(rig: Rig, agree: Any) -> TreeNode:
    """Write one 3-page host node back through a WriteBack whose rounds go to ``agree``."""
    key, _ = host_node(rig, list(range(12)), value=3)
    node = rig.tree.match_prefix(key).last_host_node
    wb = WriteBack(
        rig.tree, rig.storage, rig.counters, rig.hub, medium=StorageMedium.DISK, agree=agree
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(wb.run)
        wb.submit(node)
        wb.close()
    return node


async def test_consensus_limits_what_counts_as_stored(rig: Rig) -> None:
    async def other_rank_has_two(tag: int, stored: Sequence[int]) -> list[int] | None:
        return [min(stored[0], 2)]

    node = await release_one_job(rig, other_rank_has_two)
    (event,) = (await rig.events.receive()).events
    assert isinstance(event, BlockStored)
    assert len(event.block_hashes) == 2
    assert node.host_lock_ref == 0


async def test_a_job_released_in_another_order_elsewhere_counts_as_not_stored(rig: Rig) -> None:
    async def other_rank_at_another_job(tag: int, stored: Sequence[int]) -> list[int] | None:
        return None

    node = await release_one_job(rig, other_rank_at_another_job)
    with anyio.move_on_after(0.2):
        batch = await rig.events.receive()
        pytest.fail(f"no event for pages not every rank stored: {batch}")
    assert node.host_lock_ref == 0
