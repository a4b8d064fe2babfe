"""A base for backends that store each page as one opaque value (memory, Redis, ...).

The value is the payload followed by the codec trailer (:mod:`hicache_async.storage.codec`);
this class builds it on writes and verifies it on reads before a byte reaches a host page.
Subclasses only move values: ``_get_values``, ``_put_values`` (skip existing keys) and
``_leading``.
"""

from __future__ import annotations

import abc

from hicache_async.errors import CorruptPageError
from hicache_async.storage._base import HiCacheStorage, PageBuffer
from hicache_async.storage.codec import TRAILER_SIZE, key_digest

__all__ = ["BlobStorage"]

# A batch is moved in slices of about this many bytes: encoding, checking and copying a slice
# runs on the loop, so its size bounds the loop's stall (and the values held at once).
_SLICE_BYTES = 8 << 20


def _slices(buffers: list[PageBuffer]) -> list[tuple[int, int]]:
    """``(lo, hi)`` index ranges of ``buffers`` of about ``_SLICE_BYTES`` each (>= 1 page)."""
    bounds, lo, size = [], 0, 0
    for i, buffer in enumerate(buffers):
        size += sum(map(len, buffer))
        if size >= _SLICE_BYTES:
            bounds.append((lo, i + 1))
            lo, size = i + 1, 0
    if lo < len(buffers):
        bounds.append((lo, len(buffers)))
    return bounds


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
        found: list[bool] = []
        for lo, hi in _slices(buffers):
            found.extend(await self._read_slice(keys[lo:hi], buffers[lo:hi]))
        return found

    async def _read_slice(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        values = await self._get_values(keys)
        found: list[bool] = []
        corrupt: list[str] = []
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
        if corrupt:
            await self._delete_values(corrupt)
        return found

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        stored: list[bool] = []
        for lo, hi in _slices(buffers):
            values = [
                # One copy is unavoidable here: the value must outlive the host page.
                b"".join([*buffer, self.codec.trailer(key_digest(key), buffer)])
                for key, buffer in zip(keys[lo:hi], buffers[lo:hi], strict=True)
            ]
            for outcome in await self._put_values(keys[lo:hi], values):
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
