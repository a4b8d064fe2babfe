"""The ZMQ publisher against real ZMQ sockets on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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


def test_default_payload_is_vllms_with_every_required_key() -> None:
    batch = EventBatch((STORED, REMOVED, AllBlocksCleared()), ts=12.5, data_parallel_rank=1)
    ts, events, rank = decode_batch(encode_batch(batch))
    assert (ts, rank) == (12.5, 1)
    stored, removed, cleared = events
    assert list(stored) == [
        "type",
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
    ]
    assert stored["block_hashes"] == [hash_to_int64(H1), hash_to_int64(H2)]
    assert stored["parent_block_hash"] is None
    assert stored["token_ids"] == list(range(8))
    assert stored["medium"] == "CPU"
    assert stored["extra_keys"] == [["tenant-a"], ["tenant-a"]]
    assert removed == {
        "type": "BlockRemoved",
        "block_hashes": [hash_to_int64(H1)],
        "medium": "STORAGE",
    }
    assert cleared == {"type": "AllBlocksCleared"}  # vLLM's struct has no fields


def test_unset_rank_goes_out_as_zero_like_vllms_publisher() -> None:
    raw = msgpack.unpackb(encode_batch(EventBatch((REMOVED,), ts=1.0)))
    assert isinstance(raw, list)
    assert len(raw) == 3
    assert raw[2] == 0


def test_replaced_settings_name_their_replacement() -> None:
    from hicache_async.errors import ConfigError

    for old in ({"medium_names": "vllm"}, {"hash_format": "bytes"}):
        with pytest.raises(ConfigError, match="replaced by format="):
            KVEventsConfig(**old)


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


async def _received_until(sub: zmq.Socket[bytes], last: int) -> list[int]:
    """Sequence numbers received until ``last`` (in arrival order)."""
    seqs: list[int] = []
    while not seqs or seqs[-1] != last:
        seqs.append(int.from_bytes((await _recv(sub))[1], "big"))
    return seqs


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(30):  # a hang guard: the condition is a count, not a time
        while not condition():  # noqa: ASYNC110 - another thread changes it
            await anyio.sleep(0.005)


def _subscriber(sockets: Sockets, endpoint: str) -> zmq.Socket[bytes]:
    sub = sockets(zmq.SUB, endpoint)
    sub.setsockopt(zmq.RCVHWM, 0)
    return sub


async def test_burst_past_buffer_steps_is_numbered_and_published(sockets: Sockets) -> None:
    # Issue 19: a burst bigger than buffer_steps lost 58% of its batches before they had a
    # sequence number, and the subscriber saw a contiguous stream.
    hub = EventHub()
    config = KVEventsConfig(endpoint="tcp://127.0.0.1:*", buffer_steps=64, hwm=0)
    async with ZmqEventPublisher.open(config, hub) as publisher:
        sub = _subscriber(sockets, publisher.endpoint)
        await anyio.sleep(0.3)  # PUB/SUB: let the subscription reach the publisher
        for _ in range(1000):  # one loop turn: nothing reads in between
            hub.emit([REMOVED])
        hub.emit([STORED])  # the 1,001st batch is numbered 1000, whatever came before it
        seqs = await _received_until(sub, 1000)
        assert seqs == list(range(1001))
        assert (hub.dropped, publisher.dropped, publisher.published) == (0, 0, 1001)


async def test_a_full_queue_leaves_counted_gaps_the_subscriber_sees(sockets: Sockets) -> None:
    hub = EventHub()
    config = KVEventsConfig(endpoint="tcp://127.0.0.1:*", max_queue_size=16, hwm=0)
    async with ZmqEventPublisher.open(config, hub) as publisher:
        sub = _subscriber(sockets, publisher.endpoint)
        await anyio.sleep(0.3)
        for _ in range(5000):  # far more than the thread can take in one loop turn
            hub.emit([REMOVED])
        await _until(lambda: publisher.stats().queued == 0)
        hub.emit([STORED])  # an empty queue takes it: number 5000
        seqs = await _received_until(sub, 5000)
        assert seqs == sorted(set(seqs))  # in order, no repeats
        missing = 5001 - len(seqs)
        assert missing > 0  # the gap is on the wire for the subscriber to see ...
        assert publisher.dropped == hub.dropped == missing  # ... and every drop is counted
        assert publisher.published == len(seqs)


async def test_a_late_subscriber_replays_the_whole_buffer(sockets: Sockets) -> None:
    # Issue 19: the replay socket kept ZMQ's default high-water mark (1,000): a client that
    # read late got 1,000 of 2,500 batches and no end marker.
    hub = EventHub()
    config = KVEventsConfig(buffer_steps=3000, **LOOPBACK)
    async with ZmqEventPublisher.open(config, hub) as publisher:
        for _ in range(2500):
            hub.emit([STORED])
        await _until(lambda: publisher.published == 2500)
        assert publisher.replay_endpoint is not None
        dealer = sockets(zmq.DEALER, publisher.replay_endpoint)  # ZMQ's default receive HWM
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        await _until(lambda: publisher.replayed == 2500)  # all sent before we read any
        seqs = []
        while (frames := await _recv(dealer))[2] != END_SEQ:
            seqs.append(int.from_bytes(frames[2], "big"))
        assert seqs == list(range(2500))
        assert frames == [b"", b"", END_SEQ, b""]


async def test_replays_are_served_while_the_loop_is_busy(sockets: Sockets) -> None:
    # Issue 19: replays ran on the cache's loop (four clients cut requests by two thirds).
    hub = EventHub()
    config = KVEventsConfig(**LOOPBACK)
    async with ZmqEventPublisher.open(config, hub) as publisher:
        for _ in range(2000):
            hub.emit([STORED])
        await _until(lambda: publisher.published == 2000)
        assert publisher.replay_endpoint is not None
        dealer = sockets(zmq.DEALER, publisher.replay_endpoint)
        dealer.setsockopt(zmq.RCVTIMEO, 30_000)  # a hang guard
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        # Block the loop thread until the whole replay came: only another thread can send it.
        count = 0
        while dealer.recv_multipart()[2] != END_SEQ:
            count += 1
        assert count == 2000


async def test_malformed_replay_requests_get_vllms_answer_and_are_counted(
    sockets: Sockets,
) -> None:
    hub = EventHub()
    config = KVEventsConfig(**LOOPBACK)
    async with ZmqEventPublisher.open(config, hub) as publisher:
        for _ in range(4):
            hub.emit([REMOVED])
        await _until(lambda: publisher.published == 4)
        assert publisher.replay_endpoint is not None
        dealer = sockets(zmq.DEALER, publisher.replay_endpoint)
        dealer.send_multipart([(0).to_bytes(8, "big")])  # no delimiter: ignored
        dealer.send_multipart([b"", b"", (0).to_bytes(8, "big")])  # four frames: ignored
        dealer.send_multipart([b"", b"\x02"])  # a 1-byte start: from 2, as vLLM reads it
        dealer.send_multipart([b"", (3).to_bytes(8, "big")])
        answers = []
        for _ in range(2):
            seqs = []
            while (frames := await _recv(dealer))[2] != END_SEQ:
                seqs.append(int.from_bytes(frames[2], "big"))
            answers.append(seqs)
        assert answers == [[2, 3], [3]]  # the ignored requests got nothing, not even an end
        assert (publisher.replays, publisher.replays_malformed) == (2, 3)


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


async def test_drops_are_counted_in_stats_and_prometheus() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from hicache_async import HiCache, HiCacheConfig, KVLayout
    from hicache_async.prometheus import StatsCollector

    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", page_size=4)
    config = HiCacheConfig(
        layout=layout,
        device="cpu",
        device_pages=8,
        storage_backend="none",
        kv_events={"endpoint": "tcp://127.0.0.1:*", "max_queue_size": 4},
    )
    async with HiCache.open(config) as cache:
        assert cache.publisher is not None
        publisher = cache.publisher
        for _ in range(3000):
            cache.hub.emit([REMOVED])
        await _until(lambda: publisher.stats().queued == 0)
        stats = cache.stats()
        pub = stats.kv_publisher
        assert pub is not None
        assert pub.dropped > 0
        assert pub.published + pub.dropped == 3000
        assert stats.events_dropped == pub.dropped
        assert pub.queue_capacity == 4
        registry = CollectorRegistry()
        registry.register(StatsCollector(cache.stats))
        text = generate_latest(registry).decode()
    assert f'hicache_kv_publisher_batches_total{{fate="dropped"}} {float(pub.dropped)}' in text
    assert f'hicache_events_total{{fate="dropped"}} {float(pub.dropped)}' in text
