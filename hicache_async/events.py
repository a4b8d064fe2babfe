"""KV events: what a router or indexer needs to know about each tier's contents.

The cache emits :class:`BlockStored`, :class:`BlockRemoved` and :class:`AllBlocksCleared`, each
with the :class:`StorageMedium` it concerns, only after the fact (house rule 5): after the copy
event completed, after the backend acknowledged. Block hashes are the radix tree's chained
SHA-256 page hashes (hex); wire encoders convert them (vLLM's decoder wants the low 64 bits as
an int, see :func:`hash_to_int64`).

:class:`EventHub` numbers every batch when it makes it (:attr:`EventBatch.seq`) and fans it out
to subscribers (bounded memory streams) and sinks (the ZMQ publisher). A slow consumer loses
batches, it never blocks the cache; every loss is counted (:attr:`EventStream.dropped`,
:attr:`EventHub.dropped`) and shows as a gap in the sequence numbers the consumer sees.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from types import TracebackType
from typing import Protocol, Self

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

__all__ = [
    "AllBlocksCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBatch",
    "EventHub",
    "EventSink",
    "EventStream",
    "KVEvent",
    "Offer",
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
    """Every page left every tier (``medium`` None: what the cache emits), or left ``medium``.

    The cache clears tiers one by one with per-page :class:`BlockRemoved` events (a partial
    clear); none of the wire formats has a tiered clear, so an ``AllBlocksCleared`` built with a
    ``medium`` goes on the wire as a clear of everything."""

    medium: StorageMedium | None = None


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    """Events published together, with the wall-clock time of the batch.

    ``seq`` is the hub's count of the batches it made before this one: a subscriber that sees
    it jump lost the batches in between (they are counted in its ``dropped``)."""

    events: tuple[KVEvent, ...]
    ts: float = field(default_factory=time.time)
    data_parallel_rank: int | None = None
    seq: int = 0


class Offer(Enum):
    """What a subscriber or sink did with a batch offered to it."""

    QUEUED = "queued"  # it will be read or published
    DROPPED = "dropped"  # its buffer was full: lost, counted, a gap in what it sees
    GONE = "gone"  # it has closed: the hub forgets it


class EventSink(Protocol):
    """What :meth:`EventHub.attach` takes: an ``offer`` that never waits (the loop calls it)."""

    def offer(self, batch: EventBatch) -> Offer: ...


class EventStream:
    """One subscriber's bounded view of the event batches (an async iterator)."""

    def __init__(self, hub: EventHub, max_batches: int) -> None:
        send, receive = anyio.create_memory_object_stream[EventBatch](max_buffer_size=max_batches)
        self._hub = hub
        self._send: MemoryObjectSendStream[EventBatch] = send
        self._receive: MemoryObjectReceiveStream[EventBatch] = receive
        self.dropped = 0  # batches lost because this subscriber fell behind

    def offer(self, batch: EventBatch) -> Offer:
        """Queue ``batch`` without waiting."""
        try:
            self._send.send_nowait(batch)
        except anyio.WouldBlock:
            self.dropped += 1
            return Offer.DROPPED
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return Offer.GONE
        return Offer.QUEUED

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
    """Numbers event batches and fans them out; never blocks the publisher (the cache)."""

    def __init__(self, *, data_parallel_rank: int | None = None) -> None:
        self._subscribers: set[EventStream] = set()
        self._sinks: list[EventSink] = []
        self.data_parallel_rank = data_parallel_rank
        self.published = 0  # batches made while at least one subscriber or sink listened
        self.dropped = 0  # batches a subscriber or sink lost (its buffer was full), in all

    @property
    def active(self) -> bool:
        """Whether anyone listens: callers skip building events when nobody does."""
        return bool(self._subscribers or self._sinks)

    def subscribe(self, max_batches: int = 10_000) -> EventStream:
        """A new bounded stream of every batch emitted from now on."""
        if max_batches <= 0:
            raise ValueError(f"max_batches must be positive, not {max_batches}")
        stream = EventStream(self, max_batches)
        self._subscribers.add(stream)
        return stream

    @contextmanager
    def attach(self, sink: EventSink) -> Iterator[EventSink]:
        """Offer every batch emitted while the block runs to ``sink`` (the ZMQ publisher)."""
        self._sinks.append(sink)
        try:
            yield sink
        finally:
            self._sinks.remove(sink)

    def emit(self, events: Sequence[KVEvent]) -> None:
        """Publish ``events`` as one batch to every listener (call on the loop thread)."""
        if not events or not (self._subscribers or self._sinks):
            return
        batch = EventBatch(
            tuple(events), data_parallel_rank=self.data_parallel_rank, seq=self.published
        )
        self.published += 1
        for sink in self._sinks:
            if sink.offer(batch) is Offer.DROPPED:
                self.dropped += 1
        gone = []
        for stream in self._subscribers:
            offer = stream.offer(batch)
            if offer is Offer.DROPPED:
                self.dropped += 1
            elif offer is Offer.GONE:
                gone.append(stream)
        for stream in gone:
            self._subscribers.discard(stream)

    def _forget(self, stream: EventStream) -> None:
        self._subscribers.discard(stream)

    def close(self) -> None:
        """End every stream: readers drain what is queued, then stop."""
        for stream in self._subscribers:
            stream._send.close()
        self._subscribers.clear()
