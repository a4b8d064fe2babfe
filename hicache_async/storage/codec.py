"""The page codec: the trailer every stored page carries, and its checks.

A stored page is its payload (the page's bytes in canonical order, see
:class:`~hicache_async.memory.HostKVPool`) followed by a 64-byte trailer::

    offset size  field
    0      4     magic b"HCKV"
    4      2     format version (1)
    6      2     trailer size (64)
    8      16    key digest: blake2b-128 of the namespaced key
    24     8     layout digest: blake2b-64 of KVLayout.fingerprint
    32     8     payload length in bytes
    40     8     payload checksum: xxh3-64
    48     12    reserved (zero)
    60     4     crc32 of bytes 0..59 (the trailer checks itself first)

The trailer sits *after* the payload so that the payload starts at offset 0 of a file: reads
into host pages stay aligned with the page cache, and a truncated file loses its trailer,
which the length check sees at once. xxh3-64 hashes at ~57 GB/s here (crc32c ~28 GB/s,
zlib.crc32 ~4 GB/s), so every read is checked. Backends share this module; none copies it.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence
from typing import Final

import xxhash

from hicache_async.errors import CorruptPageError

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "TRAILER_SIZE",
    "PageCodec",
    "checksum",
    "key_digest",
    "layout_digest",
]

MAGIC: Final = b"HCKV"
FORMAT_VERSION: Final = 1
TRAILER_SIZE: Final = 64
_STRUCT: Final = struct.Struct("<4sHH16s8sQQ12xI")
assert _STRUCT.size == TRAILER_SIZE
_CRC_END: Final = TRAILER_SIZE - 4

Buffer = bytes | bytearray | memoryview


def key_digest(key: str) -> bytes:
    """The 16-byte digest of a namespaced key (also names the file of a page)."""
    return hashlib.blake2b(key.encode(), digest_size=16).digest()


def layout_digest(fingerprint: str) -> bytes:
    """The 8-byte digest of a layout fingerprint."""
    return hashlib.blake2b(fingerprint.encode(), digest_size=8).digest()


def checksum(segments: Sequence[Buffer]) -> int:
    """xxh3-64 of the concatenation of ``segments``, without concatenating them."""
    if len(segments) == 1:
        return xxhash.xxh3_64_intdigest(segments[0])
    hasher = xxhash.xxh3_64()
    for segment in segments:
        hasher.update(segment)
    return hasher.intdigest()


class PageCodec:
    """Builds and checks trailers for pages of one layout."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.layout = layout_digest(fingerprint)

    def trailer(self, digest: bytes, segments: Sequence[Buffer]) -> bytes:
        """The trailer of a page whose payload is the concatenation of ``segments``."""
        length = sum(len(s) for s in segments)
        head = _STRUCT.pack(
            MAGIC, FORMAT_VERSION, TRAILER_SIZE, digest, self.layout, length, checksum(segments), 0
        )
        return head[:_CRC_END] + struct.pack("<I", zlib.crc32(head[:_CRC_END]))

    def check_trailer(self, trailer: Buffer, digest: bytes, size: int) -> int:
        """The payload checksum ``trailer`` vouches for, once the trailer itself, the key
        digest, the layout and the payload length ``size`` check out; else
        :class:`CorruptPageError`."""
        if len(trailer) != TRAILER_SIZE:
            raise CorruptPageError(f"trailer is {len(trailer)} bytes, not {TRAILER_SIZE}")
        magic, version, tsize, key, layout, length, check, crc = _STRUCT.unpack(trailer)
        if magic != MAGIC or tsize != TRAILER_SIZE:
            raise CorruptPageError("not a hicache page (bad magic)")
        if crc != zlib.crc32(memoryview(trailer)[:_CRC_END]):
            raise CorruptPageError("the trailer fails its crc32")
        if version != FORMAT_VERSION:
            raise CorruptPageError(f"page format version {version}, expected {FORMAT_VERSION}")
        if key != digest:
            raise CorruptPageError("the page belongs to another key (misnamed)")
        if layout != self.layout:
            raise CorruptPageError(
                f"the page was written for another layout, not {self.fingerprint}"
            )
        if length != size:
            raise CorruptPageError(f"payload is {length} bytes, expected {size}")
        return int(check)

    def verify(
        self,
        trailer: Buffer,
        digest: bytes,
        segments: Sequence[Buffer],
        size: int | None = None,
    ) -> None:
        """Raise :class:`CorruptPageError` unless ``trailer`` vouches for ``segments`` (``size``
        bytes in all, when the caller knows it) under the key digest ``digest`` and this
        codec's layout."""
        expected = size if size is not None else sum(map(len, segments))
        if self.check_trailer(trailer, digest, expected) != checksum(segments):
            raise CorruptPageError("the payload fails its checksum")
