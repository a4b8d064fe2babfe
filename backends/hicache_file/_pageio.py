"""Vectored I/O helpers, and reads of the old layout's page files (one file a page).

The segment store (``_store``) writes and reads through :data:`_pwritev` / :data:`_preadv`
(indirections, so tests can inject faults such as ENOSPC). A page file of the old layout is the
payload at offset 0 followed by the codec trailer; it is read with one ``preadv`` straight
into the host page's segments plus a trailer buffer, and never written any more.

Only regular files are pages. Whatever else is found in a page's place (a directory, a FIFO,
a device, a link to one) is refused before any read, since a read from it may never return.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Sequence

from hicache_async.errors import CorruptPageError
from hicache_async.storage import PageBuffer, PageCodec
from hicache_async.storage.codec import TRAILER_SIZE, checksum

__all__ = ["NotAPageFileError", "discard_entry", "is_page_file", "read_page"]

_IOV_MAX = 1024  # Linux's limit on buffers per preadv/pwritev call
_MAX_RW = 0x7FFFF000  # Linux moves at most this many bytes per read/write call
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Opening a FIFO without O_NONBLOCK waits for a writer, for ever if none comes: with it, the
# open returns at once and fstat tells what was opened. Regular files ignore the flag.
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}

# Indirections so tests can inject faults (ENOSPC) without patching ``os`` for everyone.
_preadv = os.preadv
_pwritev = os.pwritev


class NotAPageFileError(CorruptPageError):
    """Something other than a regular file is in a page file's place."""


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


def _refuse(mode: int, path: str) -> NotAPageFileError:
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    return NotAPageFileError(f"{kind} is in the place of page file {path}")


def _open_page(path: str) -> int | None:
    # The page file's descriptor, or None when there is none; never blocks.
    try:
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):  # no page (or no shard directory)
        return None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket
            raise NotAPageFileError(f"a socket is in the place of page file {path}") from exc
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(mode, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_page(path: str, digest: bytes, buffer: PageBuffer, codec: PageCodec) -> bool:
    """Fill ``buffer`` from the page file at ``path``; ``False`` when there is none.

    Raises :class:`CorruptPageError` when the file is short, long, or fails a check (or
    :class:`NotAPageFileError` when it is no regular file); the host page may then hold
    garbage, and the caller reports the page as a miss.
    """
    fd = _open_page(path)
    if fd is None:
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


def _mode(path: str) -> int | None:
    # What ``path`` leads to (links followed), or None when nothing is there.
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None


def is_page_file(path: str) -> bool:
    """Whether a page file (a regular file, or a link to one) is at ``path``."""
    mode = _mode(path)
    return mode is not None and stat.S_ISREG(mode)


def discard_entry(path: str) -> bool:
    """Remove what is at ``path``, a file, link, FIFO or directory tree (links are removed,
    never followed); ``True`` when something was removed. Never raises: what cannot be
    removed now is tried again by the next write of the page."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except OSError:
        return False
    return True
