"""Publish KV events over ZMQ in the wire format of the consumer you name, with a replay socket.

Wire format (vLLM's ``kv_events.py``; SGLang and NVIDIA Dynamo read the same framing):

* live: PUB, one multipart message per batch ``[topic, seq (8 bytes big-endian), payload]``,
  ``seq`` counting from 0. A batch gets its number when the hub makes it, so a batch that never
  reaches the wire (the queue was full) leaves a gap a subscriber sees; it is counted too;
* payload: msgpack ``[ts, [event, ...], data_parallel_rank]``, each event a map tagged
  ``"type"`` with the fields of the consumer's structs (:data:`FORMATS`: ``vllm``, ``sglang``,
  ``dynamo``); the rank is the hub's (``HiCacheConfig.data_parallel_rank``), 0 when unset, as
  vLLM's and SGLang's publishers send it;
* replay: ROUTER; a client sends the first sequence number it wants (8 bytes big-endian) and
  gets every buffered batch from there as ``[topic, seq, payload]``, then ``[b"", ff*8, b""]``.
  Its send high-water mark is ``2 * (buffer_steps + 1)``, as vLLM's, so a whole buffer and its
  end marker always fit. A request that is not ``[identity, delimiter, start]`` gets no reply
  and one whose start is not 8 bytes is read as a big-endian number of any length (vLLM's
  behaviour); both are counted in ``replays_malformed``.

The loop only numbers a batch and appends it to a bounded queue (:meth:`offer`). A thread of
the publisher's own encodes, sends and keeps the replay buffer (resting 2 ms after each send so
batches gather: a wake-up per batch made the loop and the thread trade the GIL thousands of
times a second, which cost requests ~20% of their throughput), and serves replays in chunks
between live batches, so neither encoding nor a replay storm runs on the cache's event loop.
The thread owns the sockets while it runs; it is started in the publisher's task group
(``anyio.to_thread.run_sync``, waited for on exit) and ends once it has sent what was queued.
The endpoints bind loopback unless the configuration names another interface.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio

from hicache_async.config import KVEventsConfig
from hicache_async.errors import ConfigError
from hicache_async.events import (
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventHub,
    KVEvent,
    Offer,
    StorageMedium,
    hash_to_int64,
)
from hicache_async.metrics import KVPublisherStats

try:
    import msgpack
    import zmq
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the ZMQ KV event publisher needs pyzmq and msgpack: pip install 'hicache-async[zmq]'"
    ) from exc

__all__ = [
    "END_SEQ",
    "FORMATS",
    "WireFormat",
    "ZmqEventPublisher",
    "decode_batch",
    "encode_batch",
    "wire_hash",
]

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # ends a replay
_REPLAY_CHUNK = 512  # replayed batches sent before the thread looks at live ones again
_COALESCE = 0.002  # seconds the thread rests after sending live batches


def _signed_first_64(block_hash: str) -> int:
    """SGLang's ``hash_str_to_int64``: the first 16 hex digits as a signed int64."""
    value = int(block_hash[:16], 16)
    return value - (1 << 64) if value >= 1 << 63 else value


class WireFormat:
    """One consumer's event structs: medium names, hash integers, the fields each event has."""

    name: ClassVar[str]
    checked_against: ClassVar[str]  # the consumer's version and file the structs follow
    media: ClassVar[Mapping[StorageMedium, str]]

    def block_hash(self, block_hash: str) -> int:
        """A hex page hash as this consumer's block hash integer."""
        raise NotImplementedError

    def stored(self, event: BlockStored) -> dict[str, Any]:
        raise NotImplementedError

    def removed(self, event: BlockRemoved) -> dict[str, Any]:
        return {
            "type": "BlockRemoved",
            "block_hashes": [self.block_hash(h) for h in event.block_hashes],
            "medium": self.media[event.medium],
        }

    def event(self, event: KVEvent) -> dict[str, Any]:
        if isinstance(event, BlockStored):
            return self.stored(event)
        if isinstance(event, BlockRemoved):
            return self.removed(event)
        return {"type": "AllBlocksCleared"}  # no consumer has fields (or tiers) on it

    def _stored_head(self, event: BlockStored) -> dict[str, Any]:
        parent = event.parent_block_hash
        return {
            "type": "BlockStored",
            "block_hashes": [self.block_hash(h) for h in event.block_hashes],
            "parent_block_hash": None if parent is None else self.block_hash(parent),
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
        }

    def encode(self, batch: EventBatch) -> bytes:
        """One batch as this consumer's msgpack payload."""
        events = [self.event(event) for event in batch.events]
        rank = 0 if batch.data_parallel_rank is None else batch.data_parallel_rank
        packed: bytes = msgpack.packb([batch.ts, events, rank])
        return packed


class VllmFormat(WireFormat):
    """vLLM's ``KVEventBatch``: every required key present (nil where we have nothing), the low
    64 bits of the SHA-256 as an unsigned int (``maybe_convert_block_hash``), its medium names,
    the namespace as the per-block ``extra_keys`` entry (as vLLM sends a cache salt)."""

    name = "vllm"
    checked_against = "vLLM 0.33.0, vllm/distributed/kv_events.py"
    media: ClassVar[Mapping[StorageMedium, str]] = {
        StorageMedium.GPU: "GPU",
        StorageMedium.CPU_PINNED: "CPU",
        StorageMedium.DISK: "STORAGE",
        StorageMedium.EXTERNAL: "STORAGE",
    }

    def block_hash(self, block_hash: str) -> int:
        return hash_to_int64(block_hash)

    def stored(self, event: BlockStored) -> dict[str, Any]:
        encoded = self._stored_head(event)
        encoded.update(lora_id=None, medium=self.media[event.medium], lora_name=None)
        if event.extra_key is not None:
            encoded["extra_keys"] = [[event.extra_key]] * len(event.block_hashes)
        return encoded


class SglangFormat(WireFormat):
    """SGLang's ``KVEventBatch``: its ``StorageMedium`` values, ``hash_str_to_int64`` hashes
    (the first 16 hex digits, signed), ``lora_id`` nil, optional fields left out as its
    ``omit_defaults`` encoder does. Our hashes already carry the namespace."""

    name = "sglang"
    checked_against = "SGLang 0.5.23, sglang/srt/disaggregation/kv_events.py"
    media: ClassVar[Mapping[StorageMedium, str]] = {
        m: m.value for m in StorageMedium
    }  # GPU, CPU_PINNED, DISK, EXTERNAL

    def block_hash(self, block_hash: str) -> int:
        return _signed_first_64(block_hash)

    def stored(self, event: BlockStored) -> dict[str, Any]:
        encoded = self._stored_head(event)
        encoded.update(lora_id=None, medium=self.media[event.medium])
        return encoded


class DynamoFormat(WireFormat):
    """What Dynamo's KV router parses (``RawKvEvent``): its tier names (``from_kv_medium``),
    i64 hashes as SGLang sends them, the namespace as ``cache_salt``, only fields it knows."""

    name = "dynamo"
    checked_against = "NVIDIA Dynamo lib/kv-router/src/zmq_wire/types.rs (2026, cache_salt)"
    media: ClassVar[Mapping[StorageMedium, str]] = {
        m: m.value for m in StorageMedium
    }  # Device, HostPinned, Disk, External tiers

    def block_hash(self, block_hash: str) -> int:
        return _signed_first_64(block_hash)

    def stored(self, event: BlockStored) -> dict[str, Any]:
        encoded = self._stored_head(event)
        encoded["medium"] = self.media[event.medium]
        if event.extra_key is not None:
            encoded["cache_salt"] = event.extra_key
        return encoded


FORMATS: Mapping[str, WireFormat] = {
    f.name: f for f in (VllmFormat(), SglangFormat(), DynamoFormat())
}


def wire_hash(block_hash: str, format: str = "vllm") -> int:
    """A hex page hash as ``format`` sends it (for routers that hash prompts themselves)."""
    return FORMATS[format].block_hash(block_hash)


def encode_batch(batch: EventBatch, config: KVEventsConfig | None = None) -> bytes:
    """One batch as the payload of ``config.format`` (vLLM's by default)."""
    return FORMATS[(config or KVEventsConfig()).format].encode(batch)


def decode_batch(payload: bytes) -> tuple[float, list[dict[str, Any]], int | None]:
    """Decode a payload back to ``(ts, events, data_parallel_rank)`` (for subscribers, tests)."""
    ts, events, rank, *_ = msgpack.unpackb(payload)
    return ts, events, rank


def _check_endpoint(endpoint: str) -> None:
    if endpoint.startswith("tcp://") and endpoint[6:].split(":")[0] in {"*", "0.0.0.0", "[::]"}:
        log.warning(
            "KV events bind all interfaces on %s: anyone on the network can read them", endpoint
        )
    if "://" not in endpoint:
        raise ConfigError(f"a ZMQ endpoint looks like tcp://127.0.0.1:5557, not {endpoint!r}")


@dataclass(slots=True)
class _Replay:
    """One replay request being answered: a snapshot of the buffer from its start."""

    client: bytes
    batches: list[tuple[int, bytes]]
    sent: int = 0


class ZmqEventPublisher:
    """Serves a hub's batches on a PUB socket, and its recent batches on a ROUTER.

    Open it with :meth:`open`, which attaches it to the hub and runs its thread until the block
    ends; ``endpoint`` and ``replay_endpoint`` then hold the bound addresses (useful with a
    ``*`` port). Counters: ``published`` (batches on the wire), ``dropped`` (sequence numbers
    that never reached it), ``replays``, ``replays_malformed``, ``replayed`` (batches resent).
    """

    def __init__(self, config: KVEventsConfig) -> None:
        _check_endpoint(config.endpoint)
        if config.replay_endpoint is not None:
            _check_endpoint(config.replay_endpoint)
        self.config = config
        self._format = FORMATS[config.format]
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)  # thread's
        self._lock = threading.Lock()  # guards _pending, _woken, _stopping
        self._pending: list[tuple[int, EventBatch]] = []
        self._woken = False  # a wake-up is on its way to the thread
        self._stopping = False
        self._next_seq = 0  # the loop's: assigned when a batch is offered
        self._context = zmq.Context()  # our own: no process-global side effects
        self._pub = self._socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, config.hwm)
        self._pub.bind(config.endpoint)
        self.endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay: zmq.Socket[bytes] | None = None
        self.replay_endpoint: str | None = None
        if config.replay_endpoint is not None:
            self._replay = self._socket(zmq.ROUTER)
            # ZMQ sees reads acknowledged only every HWM/2 messages: twice the buffer lets a
            # whole replay and its end marker queue for a client that reads late (vLLM's size).
            self._replay.setsockopt(zmq.SNDHWM, 2 * (config.buffer_steps + 1))
            self._replay.bind(config.replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self._wake_rx = self._socket(zmq.PAIR)  # the thread's; the loop wakes it through tx
        self._wake_rx.bind(f"inproc://wake-{id(self)}")
        self._wake_tx = self._socket(zmq.PAIR)
        self._wake_tx.setsockopt(zmq.SNDHWM, 0)
        self._wake_tx.connect(f"inproc://wake-{id(self)}")
        self.published = 0
        self.dropped = 0
        self.replays = 0
        self.replays_malformed = 0
        self.replayed = 0

    def _socket(self, kind: int) -> zmq.Socket[bytes]:
        socket: zmq.Socket[bytes] = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        return socket

    @classmethod
    @asynccontextmanager
    async def open(cls, config: KVEventsConfig, hub: EventHub) -> AsyncIterator[ZmqEventPublisher]:
        """Publish every batch ``hub`` emits while the block runs."""
        publisher = cls(config)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(publisher._serve)
                try:
                    with hub.attach(publisher):
                        yield publisher
                finally:
                    publisher._stop()  # the thread sends what is queued, then returns
        finally:
            publisher.close()

    # -- the loop's side -----------------------------------------------------------------

    def offer(self, batch: EventBatch) -> Offer:
        """Number ``batch`` and queue it for the thread (never waits; call on the loop)."""
        seq = self._next_seq
        self._next_seq += 1
        with self._lock:
            if len(self._pending) >= self.config.max_queue_size:
                self.dropped += 1  # its number stays unused: a gap on the wire
                return Offer.DROPPED
            self._pending.append((seq, batch))
            wake, self._woken = not self._woken, True
        if wake:
            self._wake_tx.send(b"", zmq.NOBLOCK)
        return Offer.QUEUED

    def publish(self, batch: EventBatch) -> int:
        """Queue one batch for the wire (never waits); returns its sequence number."""
        seq = self._next_seq
        self.offer(batch)
        return seq

    def stats(self) -> KVPublisherStats:
        """The publisher's counters, as ``cache.stats().kv_publisher`` shows them."""
        return KVPublisherStats(
            published=self.published,
            dropped=self.dropped,
            queued=len(self._pending),
            queue_capacity=self.config.max_queue_size,
            replays=self.replays,
            replays_malformed=self.replays_malformed,
            replayed=self.replayed,
        )

    def _stop(self) -> None:
        with self._lock:
            self._stopping = True
        self._wake_tx.send(b"", zmq.NOBLOCK)

    async def _serve(self) -> None:
        await anyio.to_thread.run_sync(self._run, limiter=anyio.CapacityLimiter(1))

    # -- the thread's side ---------------------------------------------------------------

    def _run(self) -> None:
        """Send queued batches and answer replays until stopped with nothing left queued."""
        poller = zmq.Poller()
        poller.register(self._wake_rx, zmq.POLLIN)
        if self._replay is not None:
            poller.register(self._replay, zmq.POLLIN)
        replays: deque[_Replay] = deque()
        while True:
            # A wake-up comes with every first batch queued; the timeout is only a safety net.
            ready = dict(poller.poll(0 if replays else 1000))
            if self._wake_rx in ready:
                while self._wake_rx.poll(0):
                    self._wake_rx.recv()
            with self._lock:
                batches, self._pending = self._pending, []
                self._woken, stopping = False, self._stopping
            self._send_live(batches)
            if batches and not stopping:
                time.sleep(_COALESCE)  # let batches gather: fewer, larger turns on the GIL
            if stopping:
                return  # replays under way get no end marker: the publisher is going away
            if self._replay is not None and self._replay in ready:
                self._take_requests(self._replay, replays)
            if replays:
                self._replay_chunk(replays)

    def _send_live(self, batches: list[tuple[int, EventBatch]]) -> None:
        for seq, batch in batches:
            try:
                payload = self._format.encode(batch)
            except Exception:  # a bug in an encoder: this batch is a counted gap, go on
                self.dropped += 1
                log.exception("KV event batch %d could not be encoded; it is a gap", seq)
                continue
            self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], zmq.NOBLOCK)
            self._buffer.append((seq, payload))
            self.published += 1

    def _take_requests(self, socket: zmq.Socket[bytes], replays: deque[_Replay]) -> None:
        while True:
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                self.replays_malformed += 1
                log.warning("ignoring a replay request of %d frames (want 3)", len(frames))
                continue
            client, _, start = frames
            if len(start) != 8:
                self.replays_malformed += 1  # answered all the same, as vLLM does
            first = int.from_bytes(start, "big")
            self.replays += 1
            replays.append(_Replay(client, [(s, p) for s, p in self._buffer if s >= first]))

    def _replay_chunk(self, replays: deque[_Replay]) -> None:
        """Send the next chunk of the oldest replay (round robin), its end marker once done."""
        assert self._replay is not None
        replay = replays[0]
        chunk = replay.batches[replay.sent : replay.sent + _REPLAY_CHUNK]
        for seq, payload in chunk:
            frames = [replay.client, b"", self._topic, seq.to_bytes(8, "big"), payload]
            self._replay.send_multipart(frames, zmq.NOBLOCK)
        replay.sent += len(chunk)
        self.replayed += len(chunk)
        if replay.sent == len(replay.batches):
            self._replay.send_multipart([replay.client, b"", b"", END_SEQ, b""], zmq.NOBLOCK)
            replays.popleft()
        else:
            replays.rotate(-1)

    def close(self) -> None:
        """Close the sockets (idempotent; after the thread has returned)."""
        if not self._context.closed:
            for socket in (self._pub, self._replay, self._wake_rx, self._wake_tx):
                if socket is not None:
                    socket.close()
            self._context.term()
