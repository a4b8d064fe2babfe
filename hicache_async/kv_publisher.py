"""Publish KV events over ZMQ in vLLM's wire format, with a replay socket.

Wire format (see vLLM's ``kv_events.py``; routers and indexers decode it as is):

* live: PUB, one multipart message per batch ``[topic, seq (8 bytes big-endian), payload]``,
  ``seq`` counting from 0;
* payload: msgpack ``[ts, [event, ...], data_parallel_rank]``, each event a map tagged
  ``"type"`` with every required key present (nil where unknown); the rank is the hub's
  (``HiCacheConfig.data_parallel_rank`` for a cache's), nil when unset;
* replay: ROUTER; a client sends the first sequence number it wants (8 bytes big-endian) and
  gets every buffered batch from there as ``[topic, seq, payload]``, then ``[b"", ff*8, b""]``.

Sockets are driven from the event loop without blocking it: sends use ``NOBLOCK`` (PUB drops at
its high-water mark rather than wait) and the replay socket is awaited through its file
descriptor with ``anyio.wait_readable``, which works on asyncio and trio alike. The endpoints
bind loopback unless the configuration names another interface.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from hicache_async.config import KVEventsConfig
from hicache_async.errors import ConfigError
from hicache_async.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    EventHub,
    EventStream,
    KVEvent,
    hash_to_int64,
)

try:
    import msgpack
    import zmq
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the ZMQ KV event publisher needs pyzmq and msgpack: pip install 'hicache-async[zmq]'"
    ) from exc

__all__ = ["END_SEQ", "ZmqEventPublisher", "decode_batch", "encode_batch"]

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)  # ends a replay


def _hash(value: str, hash_format: str) -> int | bytes:
    return hash_to_int64(value) if hash_format == "int64" else bytes.fromhex(value)


def _event(event: KVEvent, config: KVEventsConfig) -> dict[str, Any]:
    def medium(value: Any) -> str | None:
        if value is None:
            return None
        return str(value.vllm_name if config.medium_names == "vllm" else value.value)

    fmt = config.hash_format
    if isinstance(event, BlockStored):
        encoded: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": [_hash(h, fmt) for h in event.block_hashes],
            "parent_block_hash": None
            if event.parent_block_hash is None
            else _hash(event.parent_block_hash, fmt),
            "token_ids": list(event.token_ids),
            "block_size": event.block_size,
            "lora_id": None,
            "medium": medium(event.medium),
            "lora_name": None,
        }
        if event.extra_key is not None:
            encoded["extra_keys"] = [[event.extra_key]] * len(event.block_hashes)
        return encoded
    if isinstance(event, BlockRemoved):
        return {
            "type": "BlockRemoved",
            "block_hashes": [_hash(h, fmt) for h in event.block_hashes],
            "medium": medium(event.medium),
        }
    assert isinstance(event, AllBlocksCleared)
    return {"type": "AllBlocksCleared", "medium": medium(event.medium)}


def encode_batch(batch: EventBatch, config: KVEventsConfig | None = None) -> bytes:
    """One batch as vLLM's msgpack payload."""
    config = config or KVEventsConfig()
    events = [_event(event, config) for event in batch.events]
    packed: bytes = msgpack.packb([batch.ts, events, batch.data_parallel_rank])
    return packed


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


class ZmqEventPublisher:
    """Serves one :class:`EventStream` on a PUB socket, and its recent batches on a ROUTER.

    Open it with :meth:`open`, which runs the pump and the replay service in its own task
    group until the block ends; ``endpoint`` and ``replay_endpoint`` then hold the bound
    addresses (useful with a ``*`` port).
    """

    def __init__(self, config: KVEventsConfig) -> None:
        _check_endpoint(config.endpoint)
        if config.replay_endpoint is not None:
            _check_endpoint(config.replay_endpoint)
        self.config = config
        self._topic = config.topic.encode()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._seq = 0
        self._context = zmq.Context()  # our own: no process-global side effects
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, config.hwm)
        self._pub.bind(config.endpoint)
        self.endpoint: str = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replay: zmq.Socket[bytes] | None = None
        self.replay_endpoint: str | None = None
        if config.replay_endpoint is not None:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(config.replay_endpoint)
            self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
        self.published = 0
        self.replays = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, config: KVEventsConfig, hub: EventHub) -> AsyncIterator[ZmqEventPublisher]:
        """Publish every batch ``hub`` emits while the block runs."""
        publisher = cls(config)
        try:
            async with (
                anyio.create_task_group() as tg,
                hub.subscribe(config.buffer_steps) as stream,
            ):
                tg.start_soon(publisher._pump, stream)
                if publisher._replay is not None:
                    tg.start_soon(publisher._serve_replay, publisher._replay)
                yield publisher
                tg.cancel_scope.cancel()
                for batch in stream.drain_nowait():  # what the pump had not reached yet
                    publisher.publish(batch)
        finally:
            publisher.close()

    def publish(self, batch: EventBatch) -> int:
        """Send one batch now (never waits); returns its sequence number."""
        seq, self._seq = self._seq, self._seq + 1
        payload = encode_batch(batch, self.config)
        self._buffer.append((seq, payload))
        self._pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
        self.published += 1
        return seq

    async def _pump(self, stream: EventStream) -> None:
        async for batch in stream:
            self.publish(batch)

    async def _serve_replay(self, socket: zmq.Socket[bytes]) -> None:
        while True:
            # The ZMQ descriptor is edge-triggered: drain everything before waiting again.
            while int(socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                self._answer(socket, socket.recv_multipart(zmq.NOBLOCK))
            await anyio.wait_readable(socket.FD)

    def _answer(self, socket: zmq.Socket[bytes], frames: list[bytes]) -> None:
        client, start = frames[0], frames[-1]
        if len(start) != 8:
            log.warning("ignoring a replay request of %d bytes (want 8)", len(start))
            return
        first = int.from_bytes(start, "big")
        self.replays += 1
        for seq, payload in list(self._buffer):
            if seq >= first:
                socket.send_multipart([client, b"", self._topic, seq.to_bytes(8, "big"), payload])
        socket.send_multipart([client, b"", b"", END_SEQ, b""])

    def close(self) -> None:
        """Close the sockets (idempotent)."""
        if not self._context.closed:
            self._pub.close()
            if self._replay is not None:
                self._replay.close()
            self._context.term()
