"""Blocking I/O of one page file; runs in worker threads, never on the loop.

A page file is the payload at offset 0 followed by the codec trailer. Reads go with one
``preadv`` straight into the host page's segments plus a trailer buffer; writes with one
``pwritev`` from them into a temporary file that is then renamed over the final name, so a
reader sees a whole page or none, and concurrent writers of one key both leave a whole page.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence
from typing import Literal

from hicache_async.errors import CorruptPageError
from hicache_async.storage import PageBuffer, PageCodec
from hicache_async.storage.codec import TRAILER_SIZE, checksum

__all__ = ["read_page", "remove_quietly", "write_page"]

_IOV_MAX = 1024  # Linux's limit on buffers per preadv/pwritev call
_MAX_RW = 0x7FFFF000  # Linux moves at most this many bytes per read/write call
_TOKEN = os.urandom(4).hex()  # tells apart temp files of processes sharing a directory
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

# Indirections so tests can inject faults (ENOSPC) without patching ``os`` for everyone.
_preadv = os.preadv
_pwritev = os.pwritev


def _advance(buffers: Sequence[memoryview], done: int) -> list[memoryview]:
    # The buffers still to fill after ``done`` bytes (a short read or write split one).
    rest: list[memoryview] = []
    for buf in buffers:
        if done >= len(buf):
            done -= len(buf)
            continue
        rest.append(buf[done:] if done else buf)
        done = 0
    return rest


def _readv_full(fd: int, buffers: list[memoryview], want: int, offset: int = 0) -> int:
    """Bytes read into ``buffers`` (``want`` bytes in all) from ``offset``, until they are
    full or the file ends."""
    total, pending = 0, buffers
    while True:
        request = want - total
        n = _preadv(fd, pending[:_IOV_MAX], offset + total)
        total += n
        # A regular file reads short only at its end (or past Linux's per-call cap).
        if n <= 0 or total >= want or (n < request and n < _MAX_RW and len(pending) <= _IOV_MAX):
            return total
        pending = _advance(pending, n)


def _writev_full(fd: int, buffers: list[memoryview]) -> None:
    offset, pending = 0, buffers
    while pending:
        n = _pwritev(fd, pending[:_IOV_MAX], offset)
        offset += n
        pending = _advance(pending, n)


def read_page(path: str, digest: bytes, buffer: PageBuffer, codec: PageCodec) -> bool:
    """Fill ``buffer`` from the page file at ``path``; ``False`` when there is none.

    Raises :class:`CorruptPageError` when the file is short, long, or fails a check; the
    host page may then hold garbage, and the caller reports the page as a miss.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    except FileNotFoundError:
        return False
    # One byte more than a page file holds: a longer file (another layout) is caught too.
    tail = bytearray(TRAILER_SIZE + 1)
    size = sum(map(len, buffer))
    want = size + TRAILER_SIZE + 1
    buffers = [*buffer, memoryview(tail)]
    try:
        # One call reads a whole page file (it stops one byte short of ``want``, at the end of
        # the file); the loop is for the rare short read, and for > IOV_MAX segments.
        got = _preadv(fd, buffers, 0) if len(buffers) <= _IOV_MAX else 0
        if got not in (want - 1, want):
            got = _readv_full(fd, buffers, want)
    finally:
        os.close(fd)
    if got != size + TRAILER_SIZE:
        raise CorruptPageError(f"page file is {got} bytes, expected {size + TRAILER_SIZE}: {path}")
    # Hashed right after the read, while the page is still warm in the CPU cache. (Reading
    # and hashing 256 KiB pieces of big pages was measured: no faster, more syscalls.)
    stored = codec.check_trailer(memoryview(tail)[:TRAILER_SIZE], digest, size)
    if stored != checksum(buffer):
        raise CorruptPageError(f"the payload fails its checksum: {path}")
    return True


def write_page(
    path: str,
    digest: bytes,
    buffer: PageBuffer,
    codec: PageCodec,
    fsync: Literal["none", "file", "dir"],
) -> bool:
    """Write the page file at ``path`` unless it exists; ``True`` written, ``False`` skipped."""
    if os.path.exists(path):
        return False
    tmp = f"{path}.{_TOKEN}.{os.getpid()}.{threading.get_ident()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o644)
    except FileNotFoundError:  # first page of this shard directory
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(tmp, flags, 0o644)
    try:
        try:
            _writev_full(fd, [*buffer, memoryview(codec.trailer(digest, buffer))])
            if fsync != "none":
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    if fsync == "dir":
        dfd = os.open(os.path.dirname(path), os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return True


def remove_quietly(path: str) -> None:
    """Remove ``path`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
