"""The ZMQ publisher against real ZMQ sockets on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import msgpack
import pytest
import zmq

from hicache_async.config import KVEventsConfig
from hicache_async.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventHub,
    StorageMedium,
    hash_to_int64,
)
from hicache_async.kv_publisher import END_SEQ, ZmqEventPublisher, decode_batch, encode_batch

H1, H2 = "11" * 32, "22" * 32
STORED = BlockStored((H1, H2), None, tuple(range(8)), 4, StorageMedium.CPU_PINNED, "tenant-a")
REMOVED = BlockRemoved((H1,), StorageMedium.DISK)
LOOPBACK = {"endpoint": "tcp://127.0.0.1:*", "replay_endpoint": "tcp://127.0.0.1:*"}


class Sockets:
    """Client sockets for a test, all closed at its end."""

    def __init__(self) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.open: list[zmq.Socket[bytes]] = []

    def __call__(self, kind: int, endpoint: str) -> zmq.Socket[bytes]:
        socket = self.context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        if kind == zmq.SUB:
            socket.setsockopt(zmq.SUBSCRIBE, b"")
        socket.connect(endpoint)
        self.open.append(socket)
        return socket

    def close(self) -> None:
        for socket in self.open:
            socket.close()
        self.context.term()


@pytest.fixture
def sockets() -> Iterator[Sockets]:
    made = Sockets()
    yield made
    made.close()


def test_payload_has_every_required_key_of_vllms_decoder() -> None:
    batch = EventBatch((STORED, REMOVED, AllBlocksCleared()), ts=12.5, data_parallel_rank=1)
    ts, events, rank = decode_batch(encode_batch(batch))
    assert (ts, rank) == (12.5, 1)
    stored, removed, cleared = events
    assert set(stored) >= {
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
    }
    assert stored["type"] == "BlockStored"
    assert stored["block_hashes"] == [hash_to_int64(H1), hash_to_int64(H2)]
    assert stored["parent_block_hash"] is None
    assert stored["token_ids"] == list(range(8))
    assert stored["medium"] == "CPU_PINNED"
    assert stored["extra_keys"] == [["tenant-a"], ["tenant-a"]]
    assert removed == {
        "type": "BlockRemoved",
        "block_hashes": [hash_to_int64(H1)],
        "medium": "DISK",
    }
    assert cleared["type"] == "AllBlocksCleared"


def test_vllm_medium_names_and_raw_hashes() -> None:
    config = KVEventsConfig(medium_names="vllm", hash_format="bytes")
    _, events, _ = decode_batch(encode_batch(EventBatch((STORED, REMOVED)), config))
    assert events[0]["medium"] == "CPU"
    assert events[1]["medium"] == "STORAGE"
    assert events[0]["block_hashes"][0] == bytes.fromhex(H1)


def test_batch_is_a_three_element_array() -> None:
    raw = msgpack.unpackb(encode_batch(EventBatch((REMOVED,), ts=1.0)))
    assert isinstance(raw, list)
    assert len(raw) == 3


async def _recv(socket: zmq.Socket[bytes]) -> list[bytes]:
    with anyio.fail_after(30):
        while True:
            try:
                return socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                await anyio.sleep(0.005)


async def test_live_stream_and_replay(sockets: Sockets) -> None:
    hub = EventHub()
    config = KVEventsConfig(topic="kv", **LOOPBACK)
    async with ZmqEventPublisher.open(config, hub) as publisher:
        assert publisher.endpoint.startswith("tcp://127.0.0.1:")
        sub = sockets(zmq.SUB, publisher.endpoint)
        await anyio.sleep(0.3)  # PUB/SUB: let the subscription reach the publisher
        for _ in range(3):
            hub.emit([STORED])
        hub.emit([REMOVED])
        seqs = []
        for _ in range(4):
            topic, seq, payload = await _recv(sub)
            assert topic == b"kv"
            seqs.append(int.from_bytes(seq, "big"))
        assert seqs == [0, 1, 2, 3]
        assert decode_batch(payload)[1][0]["type"] == "BlockRemoved"

        assert publisher.replay_endpoint is not None
        dealer = sockets(zmq.DEALER, publisher.replay_endpoint)
        dealer.send_multipart([b"", (2).to_bytes(8, "big")])
        replayed = []
        while True:
            frames = await _recv(dealer)
            assert frames[0] == b""
            if frames[2] == END_SEQ:
                break
            replayed.append(int.from_bytes(frames[2], "big"))
            assert frames[1] == b"kv"
        assert replayed == [2, 3]
        assert publisher.replays == 1


async def test_replay_buffer_is_bounded(sockets: Sockets) -> None:
    hub = EventHub()
    config = KVEventsConfig(buffer_steps=2, **LOOPBACK)
    async with ZmqEventPublisher.open(config, hub) as publisher:
        for _ in range(5):
            publisher.publish(EventBatch((REMOVED,)))
        assert publisher.replay_endpoint is not None
        dealer = sockets(zmq.DEALER, publisher.replay_endpoint)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        seqs = []
        while (frames := await _recv(dealer))[2] != END_SEQ:
            seqs.append(int.from_bytes(frames[2], "big"))
        assert seqs == [3, 4]  # only the newest buffer_steps batches are kept


async def test_batches_emitted_just_before_exit_are_published() -> None:
    hub = EventHub()
    async with ZmqEventPublisher.open(KVEventsConfig(endpoint="tcp://127.0.0.1:*"), hub) as pub:
        hub.emit([REMOVED])
        hub.emit([REMOVED])
    assert pub.published == 2


def test_bad_endpoint() -> None:
    from hicache_async.errors import ConfigError

    with pytest.raises(ConfigError, match="a ZMQ endpoint looks like tcp://"):
        ZmqEventPublisher(KVEventsConfig(endpoint="127.0.0.1:5557"))
