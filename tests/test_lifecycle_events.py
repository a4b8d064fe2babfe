"""Issue 18, item 7: the lower-level fixes found on the way.

- ``after_insert(key, n)`` announces whole pages only, each once, when the key ends in a
  partial page;
- ``write_through_selective`` backs a prefix up after its second hit, whether the hits come
  through sessions (``async with`` or the scheduler-level API) or the lower level;
- ``HiCacheConfig.data_parallel_rank`` is carried by every event batch, in process and on the
  wire.
"""

from __future__ import annotations

import anyio
import pytest
import torch
import zmq

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.config import KVEventsConfig
from hicache_async.errors import ConfigError
from hicache_async.events import BlockStored, EventBatch, EventStream, StorageMedium
from hicache_async.kv_publisher import decode_batch
from hicache_async.metrics import Transition
from hicache_async.radix import page_hashes

from .test_cache_e2e import serve, write_kv

PS = 4
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", page_size=PS)


def config(**kw: object) -> HiCacheConfig:
    values: dict[str, object] = {
        "layout": LAYOUT,
        "device": "cpu",
        "device_pages": 32,
        "host_pages": 0,
        "storage_backend": "none",
    }
    values.update(kw)
    return HiCacheConfig(**values)  # type: ignore[arg-type]


def insert_by_hand(cache: HiCache, tokens: list[int], *, count: str = "key") -> int:
    """What a framework with its own scheduler does: reserve slots, write the KV, insert the
    key (partial last page included) into the tree, free the duplicate and partial-page slots,
    then announce with ``after_insert``. ``count`` is how the caller counts the new tokens:
    ``key`` (the insert's length minus what it returned, as the docstring says) or
    ``aligned`` (whole pages only). Returns what the insert found cached."""
    n = len(tokens)
    aligned = n // PS * PS
    pages = -(-n // PS)
    slots = cache.device_tier.reserve(pages)
    assert slots is not None
    write_kv(cache, torch.tensor(tokens), slots[:n])
    key = cache.key(tokens)
    present = cache.tree.insert(key, slots[:n])
    cache.device_tier.free(slots[:present])  # the tree's copy serves these tokens
    cache.device_tier.free(slots[aligned:])  # the partial last page stays out of the tree
    cache.after_insert(key, (n if count == "key" else aligned) - present)
    return present


def gpu_stored(stream: EventStream) -> list[BlockStored]:
    return [
        event
        for batch in stream.drain_nowait()
        for event in batch.events
        if isinstance(event, BlockStored) and event.medium is StorageMedium.GPU
    ]


# -- after_insert: whole pages only, each once -------------------------------------------------


@pytest.mark.parametrize("count", ["key", "aligned"])
async def test_after_insert_announces_each_whole_page_once(count: str) -> None:
    short = list(range(100, 100 + 2 * PS + 2))  # 2.5 pages
    long = short[: 2 * PS] + list(range(500, 500 + 2 * PS + 2))  # extends it: 4.5 pages
    async with HiCache.open(config()) as cache, cache.events() as stream:
        assert insert_by_hand(cache, short, count=count) == 0
        assert insert_by_hand(cache, short, count=count) == 2 * PS  # again: nothing new
        assert insert_by_hand(cache, long, count=count) == 2 * PS
        events = gpu_stored(stream)
        announced = [h for event in events for h in event.block_hashes]
        whole = page_hashes(long[: 4 * PS], PS)
        assert sorted(announced) == sorted(whole)  # every whole page, exactly once
        assert announced == whole  # in prefix order
        for event in events:  # no partial page: tokens are whole pages, one hash each
            assert len(event.token_ids) == PS * len(event.block_hashes)
        assert [list(e.token_ids) for e in events] == [long[: 2 * PS], long[2 * PS : 4 * PS]]
        assert events[1].parent_block_hash == whole[1]
        cache.check()


async def test_after_insert_of_less_than_a_page_announces_nothing() -> None:
    async with HiCache.open(config()) as cache, cache.events() as stream:
        assert insert_by_hand(cache, [7, 8, 9]) == 0
        assert gpu_stored(stream) == []
        insert_by_hand(cache, list(range(10, 10 + PS)))
        insert_by_hand(cache, list(range(10, 10 + PS + 1)))  # the same page and one token
        assert [e.block_hashes for e in gpu_stored(stream)] == [
            tuple(page_hashes(list(range(10, 10 + PS)), PS))
        ]
        cache.check()


async def test_sessions_with_a_partial_tail_announce_each_page_once() -> None:
    prompt = torch.arange(2000, 2000 + 2 * PS + 2)  # 2.5 pages; then a longer turn
    turn = torch.cat([prompt[: 2 * PS], torch.arange(3000, 3000 + 2 * PS + 3)])
    async with HiCache.open(config()) as cache, cache.events() as stream:
        await serve(cache, prompt)
        await serve(cache, prompt)
        await serve(cache, turn)
        announced = [h for e in gpu_stored(stream) for h in e.block_hashes]
        assert announced == page_hashes(turn[: 4 * PS].tolist(), PS)
        cache.check()


# -- write_through_selective: the second hit backs up -------------------------------------------


def selective() -> HiCacheConfig:
    return config(host_pages=64, write_policy="write_through_selective")


def backups(cache: HiCache) -> int:
    return cache.stats().transitions[Transition.BACKUP].count


async def scheduler_hit(cache: HiCache, tokens: torch.Tensor) -> int:
    """A request admitted and finished through the scheduler-level API."""
    s = cache.session(tokens).enter()
    try:
        hit = await s.load()
    except BaseException:
        s.abort()
        raise
    s.finish()
    return hit.length


@pytest.mark.parametrize("hits", [1, 2])
async def test_selective_backup_after_two_scheduler_level_hits(hits: int) -> None:
    prompt = torch.arange(40, 40 + 3 * PS)
    async with HiCache.open(selective()) as cache:
        await serve(cache, prompt)  # inserted: no hit yet
        await cache.drain()
        assert backups(cache) == 0
        for _ in range(hits):
            assert await scheduler_hit(cache, prompt) == prompt.numel()
        await cache.drain()
        assert (backups(cache) > 0) is (hits == 2)
        cache.check()


@pytest.mark.parametrize("hits", [1, 2])
async def test_selective_backup_after_two_session_hits(hits: int) -> None:
    prompt = torch.arange(40, 40 + 3 * PS)
    async with HiCache.open(selective()) as cache:
        await serve(cache, prompt)
        for _ in range(hits):
            assert await serve(cache, prompt) == prompt.numel()
        await cache.drain()
        assert (backups(cache) > 0) is (hits == 2)
        cache.check()


@pytest.mark.parametrize("hits", [1, 2])
@pytest.mark.parametrize("path", ["cache.match_prefix", "tree.match_prefix"])
async def test_selective_backup_after_two_lower_level_hits(path: str, hits: int) -> None:
    tokens = list(range(60, 60 + 3 * PS))
    async with HiCache.open(selective()) as cache:
        insert_by_hand(cache, tokens)
        key = cache.key(tokens)
        for _ in range(hits):
            if path == "cache.match_prefix":
                match = cache.match_prefix(key)
            else:
                match = cache.tree.match_prefix(key)
            cache.after_match(match)  # what a framework does with a match it uses
            assert match.device_hit_length == len(tokens)
        await cache.drain()
        assert (backups(cache) > 0) is (hits == 2)
        if hits == 2:
            assert cache.match_prefix(key).last_device_node.host_pages is not None
        cache.check()


async def test_after_match_is_a_no_op_under_other_policies() -> None:
    tokens = list(range(60, 60 + 3 * PS))
    async with HiCache.open(config(host_pages=64, write_policy="write_back")) as cache:
        insert_by_hand(cache, tokens)
        for _ in range(3):
            cache.after_match(cache.tree.match_prefix(cache.key(tokens)))
        await cache.drain()
        assert backups(cache) == 0
        cache.check()


# -- data_parallel_rank: on every batch, in process and on the wire -----------------------------


async def _recv(socket: zmq.Socket[bytes]) -> list[bytes]:
    with anyio.fail_after(30):
        while True:
            try:
                return socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                await anyio.sleep(0.005)


async def test_data_parallel_rank_on_every_batch_and_on_the_wire() -> None:
    events = KVEventsConfig(endpoint="tcp://127.0.0.1:*")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with HiCache.open(config(data_parallel_rank=3, kv_events=events)) as cache:
            assert cache.hub.data_parallel_rank == 3
            assert cache.publisher is not None
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(cache.publisher.endpoint)
            async with cache.events() as stream:
                # PUB/SUB: until the subscription reaches the publisher, batches are lost.
                # Send until one arrives (each a whole request), then check what did.
                tokens = 7000
                with anyio.fail_after(30):
                    while True:
                        await serve(cache, torch.arange(tokens, tokens + PS))
                        tokens += PS
                        try:
                            frames = sub.recv_multipart(zmq.NOBLOCK)
                            break
                        except zmq.Again:
                            await anyio.sleep(0.01)
                await serve(cache, torch.arange(9000, 9000 + 2 * PS))
                wire = [decode_batch(frames[2])]
                while wire[-1][1][0]["token_ids"][0] != 9000:  # up to the last request's
                    wire.append(decode_batch((await _recv(sub))[2]))
                batches: list[EventBatch] = stream.drain_nowait()
            sub.close()
        assert {rank for _, _, rank in wire} == {3}
        assert all(events[0]["type"] == "BlockStored" for _, events, _ in wire)
        assert wire[-1][1][0]["token_ids"] == list(range(9000, 9000 + 2 * PS))
        assert batches
        assert {batch.data_parallel_rank for batch in batches} == {3}
    finally:
        context.term()


async def test_data_parallel_rank_unset_is_none() -> None:
    async with HiCache.open(config()) as cache, cache.events() as stream:
        await serve(cache, torch.arange(0, 2 * PS))
        batches = stream.drain_nowait()
        assert batches
        assert {batch.data_parallel_rank for batch in batches} == {None}


def test_data_parallel_rank_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HICACHE_DATA_PARALLEL_RANK", "2")
    assert config().data_parallel_rank == 2


@pytest.mark.parametrize("bad", [-1, True, 1.5, "two", 2**31])
def test_bad_data_parallel_rank_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError, match="data_parallel_rank"):
        config(data_parallel_rank=bad)
