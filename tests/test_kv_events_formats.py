"""Each wire format against a strict decoder written from its consumer's published structs.

The structs below are transcribed from the consumers' own definitions, not from our encoder:
vLLM 0.33.0 ``vllm/distributed/kv_events.py``, SGLang 0.5.23
``sglang/srt/disaggregation/kv_events.py`` and NVIDIA Dynamo's ``RawKvEvent``
(``lib/kv-router/src/zmq_wire/types.rs`` and ``deserialize.rs``, 2026, with ``cache_salt``).
Every struct forbids unknown fields, so a key the consumer does not define fails the decode.
A real cache publishes over real ZMQ sockets on loopback.
"""

from __future__ import annotations

from typing import Annotated, Any

import anyio
import msgpack
import msgspec
import pytest
import torch
import zmq

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.events import hash_to_int64
from hicache_async.kv_publisher import END_SEQ
from hicache_async.radix import page_hashes

from .test_cache_e2e import serve
from .test_kv_publisher import Sockets, sockets  # noqa: F401 - the fixture

STRICT: dict[str, Any] = {"forbid_unknown_fields": True, "gc": False}
I64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
I32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]


# -- vLLM 0.33.0 ----------------------------------------------------------------------------
class VllmEvent(msgspec.Struct, omit_defaults=True, tag=True, **STRICT):
    pass


class VllmBlockStored(VllmEvent, tag="BlockStored"):
    block_hashes: list[bytes | int]  # ExternalBlockHash
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class VllmBlockRemoved(VllmEvent, tag="BlockRemoved"):
    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class VllmAllBlocksCleared(VllmEvent, tag="AllBlocksCleared"):
    pass


class VllmKVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, **STRICT):
    ts: float
    events: list[VllmBlockStored | VllmBlockRemoved | VllmAllBlocksCleared]
    data_parallel_rank: int | None = None


# -- SGLang 0.5.23 --------------------------------------------------------------------------
class SglangEvent(msgspec.Struct, omit_defaults=True, tag=True, **STRICT):
    pass


class SglangBlockStored(SglangEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    lora_name: str | None = None


class SglangBlockRemoved(SglangEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


class SglangAllBlocksCleared(SglangEvent, tag="AllBlocksCleared"):
    pass


class SglangKVEventBatch(msgspec.Struct, array_like=True, **STRICT):
    ts: float
    events: list[SglangBlockStored | SglangBlockRemoved | SglangAllBlocksCleared]
    attn_dp_rank: int | None = None


SGLANG_MEDIA = {"GPU", "CPU_PINNED", "DISK", "EXTERNAL"}  # its StorageMedium values


# -- NVIDIA Dynamo (RawKvEvent, what its KV router parses) ----------------------------------
class DynamoEvent(msgspec.Struct, tag=True, **STRICT):
    pass


class DynamoBlockStored(DynamoEvent, tag="BlockStored"):
    # BlockHashValue is Signed(i64) | Unsigned(u64) now; routers before it read i64 only.
    block_hashes: list[I64]
    token_ids: list[U32]
    block_size: Annotated[int, msgspec.Meta(ge=0)]
    parent_block_hash: I64 | None = None
    medium: str | None = None
    lora_name: str | None = None
    cache_salt: str | None = None
    extra_keys: list[list[Any] | None] | None = None
    block_mm_infos: list[Any] | None = None
    is_eagle: bool | None = None
    group_idx: U32 | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: U32 | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class DynamoBlockRemoved(DynamoEvent, tag="BlockRemoved"):
    block_hashes: list[I64]
    medium: str | None = None
    group_idx: U32 | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: U32 | None = None
    locality: str | None = None
    ownership: str | None = None


class DynamoAllBlocksCleared(DynamoEvent, tag="AllBlocksCleared"):
    ownership: str | None = None


class DynamoKVEventBatch(msgspec.Struct, array_like=True, **STRICT):  # (f64, Vec, Option<i32>)
    ts: float
    events: list[DynamoBlockStored | DynamoBlockRemoved | DynamoAllBlocksCleared]
    data_parallel_rank: I32 | None


def dynamo_tier(medium: str | None) -> str:
    """``StorageTier::from_kv_medium_or_default``: an unknown name counts as the device."""
    tiers = {
        "GPU": "device",
        "DEVICE": "device",
        "CPU": "host_pinned",
        "CPU_PINNED": "host_pinned",
        "CPU_TIER1": "host_pinned",
        "CPU_TIER2": "disk",
        "DISK": "disk",
        "NVME": "disk",
        "EXTERNAL": "external",
        "NETWORK": "external",
        "REMOTE": "external",
        "SHARED": "external",
    }
    return tiers.get(medium or "", "device")


def signed_first_64(block_hash: str) -> int:
    """SGLang's ``hash_str_to_int64``, written from its definition."""
    value = int(block_hash[:16], 16)
    return value - 2**64 if value >= 2**63 else value


DECODERS = {"vllm": VllmKVEventBatch, "sglang": SglangKVEventBatch, "dynamo": DynamoKVEventBatch}
HASH = {"vllm": hash_to_int64, "sglang": signed_first_64, "dynamo": signed_first_64}
# What each consumer's medium names say about our tiers (GPU, CPU_PINNED, EXTERNAL here).
TIER = {
    "vllm": {"GPU": "gpu", "CPU": "cpu", "STORAGE": "l3"},
    "sglang": {"GPU": "gpu", "CPU_PINNED": "cpu", "EXTERNAL": "l3"},
    "dynamo": {"GPU": "gpu", "CPU_PINNED": "cpu", "EXTERNAL": "l3"},
}

DYNAMO_TIER = {"GPU": "device", "CPU_PINNED": "host_pinned", "EXTERNAL": "external"}

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", page_size=4)
PROMPT = torch.arange(700, 700 + 6 * 4)  # six pages


def config(fmt: str, rank: int | None) -> HiCacheConfig:
    return HiCacheConfig(
        layout=LAYOUT,
        device="cpu",
        device_pages=8,
        host_pages=8,
        storage_backend="memory",
        prefetch_threshold=4,
        data_parallel_rank=rank,
        kv_events={
            "endpoint": "tcp://127.0.0.1:*",
            "replay_endpoint": "tcp://127.0.0.1:*",
            "format": fmt,
            "hwm": 0,
        },
    )


async def _recv(socket: zmq.Socket[bytes]) -> list[bytes]:
    with anyio.fail_after(30):  # a hang guard
        while True:
            try:
                return socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                await anyio.sleep(0.002)


async def workload(cache: HiCache) -> None:
    """L1, L2 and L3 stores, evictions from each, a namespaced prompt, a partial clear, a
    refill from L3, and a clear of everything."""
    await serve(cache, PROMPT)
    await serve(cache, torch.arange(5000, 5000 + 5 * 4))  # L1 and L2 must evict
    async with cache.session(PROMPT[:8], extra_key="tenant-a") as s:
        await s.load()
        await s.commit(await s.allocate(8))
    await cache.drain()
    await cache.clear()  # L3 keeps its pages
    await serve(cache, PROMPT)  # prefetched back from L3
    await cache.drain()
    await cache.clear(storage=True)


@pytest.mark.parametrize(("fmt", "rank"), [("vllm", 1), ("sglang", None), ("dynamo", 3)])
async def test_format_decodes_strictly_with_its_consumers_structs(
    fmt: str,
    rank: int | None,
    sockets: Sockets,  # noqa: F811 - the fixture
) -> None:
    decoder = msgspec.msgpack.Decoder(DECODERS[fmt])
    to_wire = HASH[fmt]
    async with HiCache.open(config(fmt, rank)) as cache:
        pub = cache.publisher
        assert pub is not None
        assert pub.replay_endpoint is not None
        sub = sockets(zmq.SUB, pub.endpoint)
        sub.setsockopt(zmq.RCVHWM, 0)
        await anyio.sleep(0.3)  # PUB/SUB: let the subscription reach the publisher
        await workload(cache)
        live = [await _recv(sub) for _ in range(cache.hub.published)]
        dealer = sockets(zmq.DEALER, pub.replay_endpoint)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while (frames := await _recv(dealer))[2] != END_SEQ:
            replayed.append(frames[1:])
        stats = cache.stats()

    assert [int.from_bytes(f[1], "big") for f in live] == list(range(len(live)))  # contiguous
    assert replayed == live  # byte for byte
    assert stats.events_dropped == 0
    assert stats.kv_publisher is not None
    assert stats.kv_publisher.dropped == 0

    router: dict[str, set[int]] = {"gpu": set(), "cpu": set(), "l3": set()}
    later_parents: list[int] = []
    cleared_once = False
    known = {to_wire(h) for h in page_hashes(PROMPT.tolist(), 4)}
    for _, _, payload in live:
        batch = decoder.decode(payload)  # strict: unknown fields, wrong types, ranges fail
        if fmt in ("vllm", "sglang"):  # the keys and values their own encoders would send
            assert msgpack.unpackb(msgspec.msgpack.encode(batch)) == msgpack.unpackb(payload)
        if fmt == "vllm":
            assert batch.data_parallel_rank == rank
        elif fmt == "sglang":
            assert batch.attn_dp_rank == 0  # unset: 0, as SGLang's publisher sends
        else:
            assert batch.data_parallel_rank == rank  # set: Dynamo keys workers by it
        for event in batch.events:
            name = type(event).__name__
            if name.endswith("AllBlocksCleared"):
                for held in router.values():
                    held.clear()  # every consumer reads it as clear-all
                continue
            assert event.medium is not None
            if fmt == "sglang":
                assert event.medium in SGLANG_MEDIA
            if fmt == "dynamo":
                assert dynamo_tier(event.medium) == DYNAMO_TIER[event.medium]
            tier = router[TIER[fmt][event.medium]]
            if name.endswith("BlockStored"):
                if cleared_once and event.parent_block_hash is not None:
                    later_parents.append(event.parent_block_hash)
                assert len(event.token_ids) == event.block_size * len(event.block_hashes)
                tier.update(event.block_hashes)
            else:
                tier.difference_update(event.block_hashes)
        if not cleared_once and not router["gpu"] and not router["cpu"] and router["l3"]:
            # The partial clear: what L3 holds is still known; L1 and L2 are empty.
            cleared_once = True
            assert known <= router["l3"]
    assert cleared_once
    assert all(p in router["l3"] or p in known for p in later_parents)
    assert router == {"gpu": set(), "cpu": set(), "l3": set()}  # after the clear of everything


@pytest.mark.parametrize("fmt", ["vllm", "sglang", "dynamo"])
def test_hashes_fit_the_consumers_integers(fmt: str) -> None:
    from hicache_async.events import BlockStored, EventBatch, StorageMedium
    from hicache_async.kv_publisher import FORMATS

    big = "f" * 64  # over int64 as vLLM's unsigned low 64 bits; negative as SGLang's int64
    event = BlockStored((big, "0" * 64), big, tuple(range(8)), 4, StorageMedium.GPU, "ns")
    batch = msgspec.msgpack.Decoder(DECODERS[fmt]).decode(FORMATS[fmt].encode(EventBatch((event,))))
    stored = batch.events[0]
    if fmt == "vllm":
        assert stored.block_hashes == [2**64 - 1, 0]
        assert stored.extra_keys == [("ns",), ("ns",)]  # the namespace, vLLM's per-block salt
    else:
        assert stored.block_hashes == [-1, 0]
        msgspec.msgpack.Decoder(list[I64]).decode(msgspec.msgpack.encode(stored.block_hashes))
    if fmt == "dynamo":
        assert stored.cache_salt == "ns"
