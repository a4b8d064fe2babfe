"""A base for backends that store each page as one opaque value (memory, Redis, ...).

The value is the payload followed by the codec trailer (:mod:`hicache_async.storage.codec`);
this class builds it on writes and verifies it on reads before a byte reaches a host page.
Subclasses only move values: ``_get_values``, ``_put_values`` (skip existing keys) and
``_leading``.
"""

from __future__ import annotations

import abc

import anyio
import anyio.lowlevel

from hicache_async.errors import CorruptPageError
from hicache_async.storage._base import HiCacheStorage, PageBuffer
from hicache_async.storage.codec import TRAILER_SIZE, key_digest

__all__ = ["BlobStorage"]

# Yield to the loop after this many bytes copied, so big batches do not stall it.
_YIELD_BYTES = 16 << 20


class BlobStorage(HiCacheStorage):
    """Stores each page as ``payload + trailer`` under its namespaced key."""

    @abc.abstractmethod
    async def _get_values(self, keys: list[str]) -> list[bytes | memoryview | None]:
        """The values under ``keys``; ``None`` per missing key. A failure of the whole batch
        raises (the contract turns it into misses)."""

    @abc.abstractmethod
    async def _delete_values(self, keys: list[str]) -> None:
        """Remove ``keys`` (pages that failed their check, so they can be written again)."""

    @abc.abstractmethod
    async def _put_values(self, keys: list[str], values: list[bytes]) -> list[bool | None]:
        """Store ``values`` unless their key exists: ``True`` stored, ``None`` already there
        (skipped), ``False`` failed."""

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        values = await self._get_values(keys)
        found: list[bool] = []
        corrupt: list[str] = []
        copied = 0
        for key, value, buffer in zip(keys, values, buffers, strict=True):
            if value is None:
                found.append(False)
                continue
            try:
                self._decode_into(key, memoryview(value), buffer)
            except CorruptPageError as exc:
                self.stats.record_error("corrupt", exc)
                corrupt.append(key)
                found.append(False)
                continue
            found.append(True)
            copied += len(value)
            if copied >= _YIELD_BYTES:
                copied = 0
                await anyio.lowlevel.checkpoint()
        if corrupt:
            await self._delete_values(corrupt)
        return found

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        values = []
        for key, buffer in zip(keys, buffers, strict=True):
            # One copy is unavoidable here: the value must outlive the host page.
            values.append(b"".join([*buffer, self.codec.trailer(key_digest(key), buffer)]))
        outcomes = await self._put_values(keys, values)
        stored = []
        for outcome in outcomes:
            if outcome is None:
                self.stats.set_skipped += 1
            stored.append(outcome is not False)
        return stored

    def _decode_into(self, key: str, value: memoryview, buffer: PageBuffer) -> None:
        size = sum(len(s) for s in buffer)
        if len(value) != size + TRAILER_SIZE:
            raise CorruptPageError(
                f"stored value is {len(value)} bytes, expected {size + TRAILER_SIZE}"
            )
        payload, offset = [], 0
        for segment in buffer:
            payload.append(value[offset : offset + len(segment)])
            offset += len(segment)
        # Check before copying: bytes that fail are never written into the host page.
        self.codec.verify(value[size:], key_digest(key), payload)
        for segment, part in zip(buffer, payload, strict=True):
            segment[:] = part
