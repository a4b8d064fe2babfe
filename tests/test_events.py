from __future__ import annotations

import pytest

from hicache_async.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventHub,
    StorageMedium,
    hash_to_int64,
)

STORED = BlockStored(
    block_hashes=("aa" * 32,),
    parent_block_hash=None,
    token_ids=(1, 2, 3, 4),
    block_size=4,
    medium=StorageMedium.GPU,
)


async def test_subscribers_get_batches_in_order() -> None:
    hub = EventHub(data_parallel_rank=3)
    async with hub.subscribe() as first, hub.subscribe() as second:
        hub.emit([STORED])
        hub.emit([BlockRemoved(("aa" * 32,), StorageMedium.GPU), AllBlocksCleared()])
        for stream in (first, second):
            one, two = await stream.receive(), await stream.receive()
            assert one.events == (STORED,)
            assert [type(e).__name__ for e in two.events] == ["BlockRemoved", "AllBlocksCleared"]
            assert one.data_parallel_rank == 3
            assert one.ts <= two.ts
    assert hub.published == 2


async def test_nobody_listening_costs_nothing() -> None:
    hub = EventHub()
    assert not hub.active
    hub.emit([STORED])
    assert hub.published == 0


async def test_slow_subscriber_drops_and_never_blocks() -> None:
    hub = EventHub()
    async with hub.subscribe(max_batches=2) as slow:
        for _ in range(5):
            hub.emit([STORED])  # synchronous: it cannot wait for the reader
        assert slow.dropped == 3
        assert hub.dropped == 3
        assert slow.pending() == 2
        # Batches are numbered when made: the reader sees the gap the drops left.
        assert [batch.seq for batch in slow.drain_nowait()] == [0, 1]
        hub.emit([STORED])
        assert (await slow.receive()).seq == 5
    assert hub.dropped == 3  # a total: it stays when the stream goes


async def test_sinks_get_every_batch_and_their_drops_count() -> None:
    from hicache_async.events import EventBatch, Offer

    class Full:
        def __init__(self) -> None:
            self.seen: list[int] = []

        def offer(self, batch: EventBatch) -> Offer:
            self.seen.append(batch.seq)
            return Offer.DROPPED if batch.seq % 2 else Offer.QUEUED

    hub = EventHub()
    sink = Full()
    with hub.attach(sink):
        assert hub.active
        for _ in range(4):
            hub.emit([STORED])
    assert not hub.active
    hub.emit([STORED])
    assert (sink.seen, hub.published, hub.dropped) == ([0, 1, 2, 3], 4, 2)


async def test_closed_subscriber_is_forgotten() -> None:
    hub = EventHub()
    async with hub.subscribe() as stream:
        hub.emit([STORED])
        assert (await stream.receive()).events == (STORED,)
    assert not hub.active
    hub.emit([STORED])  # no error for the departed reader


async def test_hub_close_ends_iteration_after_draining() -> None:
    hub = EventHub()
    async with hub.subscribe() as stream:
        hub.emit([STORED])
        hub.emit([STORED])
        hub.close()
        seen = [batch async for batch in stream]
    assert len(seen) == 2


async def test_empty_emit_and_bad_buffer() -> None:
    hub = EventHub()
    async with hub.subscribe():
        hub.emit([])
    assert hub.published == 0
    with pytest.raises(ValueError, match="max_batches must be positive"):
        hub.subscribe(0)


def test_medium_names_and_hash_conversion() -> None:
    assert StorageMedium.CPU_PINNED == "CPU_PINNED"
    assert [m.vllm_name for m in StorageMedium] == ["GPU", "CPU", "STORAGE", "STORAGE"]
    digest = "00" * 24 + "0123456789abcdef"
    assert hash_to_int64(digest) == 0x0123456789ABCDEF
    assert hash_to_int64("f" * 64) == 2**64 - 1
