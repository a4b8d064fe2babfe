"""KV events: what a router or indexer needs to know about each tier's contents.

The cache emits :class:`BlockStored`, :class:`BlockRemoved` and :class:`AllBlocksCleared`, each
with the :class:`StorageMedium` it concerns, only after the fact (house rule 5): after the copy
event completed, after the backend acknowledged. Block hashes are the radix tree's chained
SHA-256 page hashes (hex); wire encoders convert them (vLLM's decoder wants the low 64 bits as
an int, see :func:`hash_to_int64`).

:class:`EventHub` fans batches out to subscribers through bounded memory streams: a slow
consumer loses batches (counted in :attr:`EventStream.dropped`), it never blocks the cache.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Self

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "EventHub",
    "EventStream",
    "KVEvent",
    "StorageMedium",
    "hash_to_int64",
]


class StorageMedium(StrEnum):
    """The tier a KV event concerns (SGLang's names)."""

    GPU = "GPU"  # L1: device memory
    CPU_PINNED = "CPU_PINNED"  # L2: host memory
    DISK = "DISK"  # L3: local or shared files
    EXTERNAL = "EXTERNAL"  # L3: a remote store (Redis, Mooncake, ...)

    @property
    def vllm_name(self) -> str:
        """vLLM's name for this medium (``GPU``, ``CPU``, ``STORAGE``)."""
        return _VLLM_NAMES[self]


_VLLM_NAMES = {
    StorageMedium.GPU: "GPU",
    StorageMedium.CPU_PINNED: "CPU",
    StorageMedium.DISK: "STORAGE",
    StorageMedium.EXTERNAL: "STORAGE",
}


def hash_to_int64(block_hash: str) -> int:
    """The low 64 bits of a hex block hash, as vLLM's wire format carries it (unsigned)."""
    return int(block_hash[-16:], 16)


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Pages became resident in ``medium``: one hash per page, in prefix order."""

    block_hashes: tuple[str, ...]
    parent_block_hash: str | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: StorageMedium
    extra_key: str | None = None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Pages left ``medium``."""

    block_hashes: tuple[str, ...]
    medium: StorageMedium


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every page left ``medium`` (every tier when ``medium`` is None)."""

    medium: StorageMedium | None = None


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events published together, with the wall-clock time of the batch."""

    events: tuple[KVEvent, ...]
    ts: float = field(default_factory=time.time)
    data_parallel_rank: int | None = None


class EventStream:
    """One subscriber's bounded view of the event batches (an async iterator)."""

    def __init__(self, hub: EventHub, max_batches: int) -> None:
        send, receive = anyio.create_memory_object_stream[EventBatch](max_buffer_size=max_batches)
        self._hub = hub
        self._send: MemoryObjectSendStream[EventBatch] = send
        self._receive: MemoryObjectReceiveStream[EventBatch] = receive
        self.dropped = 0  # batches lost because this subscriber fell behind

    def _offer(self, batch: EventBatch) -> bool:
        """Queue ``batch`` without waiting; False once the subscriber has gone."""
        try:
            self._send.send_nowait(batch)
        except anyio.WouldBlock:
            self.dropped += 1
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        return True

    def pending(self) -> int:
        """Batches queued and not yet read."""
        return self._receive.statistics().current_buffer_used

    def __aiter__(self) -> AsyncIterator[EventBatch]:
        return self._batches()

    async def _batches(self) -> AsyncIterator[EventBatch]:
        async for batch in self._receive:
            yield batch

    def drain_nowait(self) -> list[EventBatch]:
        """Every batch queued now, without waiting."""
        batches = []
        while True:
            try:
                batches.append(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                return batches

    async def receive(self) -> EventBatch:
        """The next batch; raises ``anyio.EndOfStream`` once the hub closed and it is drained."""
        return await self._receive.receive()

    def close(self) -> None:
        """Stop receiving; the hub forgets this subscriber."""
        self._hub._forget(self)
        self._receive.close()
        self._send.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EventHub:
    """Fans event batches out to subscribers; never blocks the publisher (the cache)."""

    def __init__(self, *, data_parallel_rank: int | None = None) -> None:
        self._subscribers: set[EventStream] = set()
        self.data_parallel_rank = data_parallel_rank
        self.published = 0  # batches emitted while at least one subscriber listened

    @property
    def active(self) -> bool:
        """Whether anyone listens: callers skip building events when nobody does."""
        return bool(self._subscribers)

    def subscribe(self, max_batches: int = 10_000) -> EventStream:
        """A new bounded stream of every batch emitted from now on."""
        if max_batches <= 0:
            raise ValueError(f"max_batches must be positive, not {max_batches}")
        stream = EventStream(self, max_batches)
        self._subscribers.add(stream)
        return stream

    def emit(self, events: Sequence[KVEvent]) -> None:
        """Publish ``events`` as one batch to every subscriber (call on the loop thread)."""
        if not events or not self._subscribers:
            return
        batch = EventBatch(tuple(events), data_parallel_rank=self.data_parallel_rank)
        self.published += 1
        gone = [stream for stream in self._subscribers if not stream._offer(batch)]
        for stream in gone:
            self._subscribers.discard(stream)

    def _forget(self, stream: EventStream) -> None:
        self._subscribers.discard(stream)

    @property
    def dropped(self) -> int:
        """Batches lost across the current subscribers."""
        return sum(stream.dropped for stream in self._subscribers)

    def close(self) -> None:
        """End every stream: readers drain what is queued, then stop."""
        for stream in self._subscribers:
            stream._send.close()
        self._subscribers.clear()
