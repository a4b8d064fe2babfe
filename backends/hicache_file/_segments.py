"""Segment files: where page payloads live, appended by one writer each.

``{path}/segments/{id:012d}.seg``, ``id`` from the index (never reused). A backend instance
appends a whole batch of pages to its active segment with one ``pwritev`` (payloads at
:data:`~hicache_file._index.ALIGN` boundaries) and holds an exclusive ``flock`` on it for as
long as it may write there; the kernel drops the lock when the process dies, however it dies.
So a process that finds an active segment whose lock it can take knows its writer is gone,
and cuts it back to the end the index committed: the bytes of a batch killed before its
commit are never indexed, and never stay on the disk.

A removed page's blocks are freed by punching a hole (``fallocate``); a sealed segment with no
page left is removed. Blocking: called from worker threads only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
from collections.abc import Sequence

from hicache_async.errors import CorruptPageError
from hicache_file._index import ALIGN, place

__all__ = [
    "ActiveSegment",
    "NotASegmentError",
    "open_segment",
    "punch",
    "remove_segment",
    "segment_path",
    "try_reclaim",
]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int

SEGMENTS = "segments"


class NotASegmentError(CorruptPageError):
    """Something other than a regular file is in a segment file's place."""


def segment_path(root: str, seg: int) -> str:
    """The file of segment ``seg``."""
    return f"{root}/{SEGMENTS}/{seg:012d}.seg"


def open_segment(path: str) -> int | None:
    """A read descriptor of the segment at ``path``; ``None`` when there is none. Whatever
    else is in its place (a FIFO, a directory) is refused without blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a socket
            raise NotASegmentError(f"a socket is in the place of segment {path}") from exc
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotASegmentError(f"no regular file is in the place of segment {path}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def punch(fd: int, off: int, size: int) -> bool:
    """Free the blocks of ``[off, off + size)``; ``False`` where the file system cannot."""
    if _fallocate is None or size <= 0:
        return False
    flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _fallocate(fd, flags, off, size) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, os.strerror(err))


def punch_at(path: str, holes: Sequence[tuple[int, int]]) -> None:
    """Punch ``(offset, bytes)`` holes in the segment at ``path`` (gone: nothing to do)."""
    try:
        fd = os.open(path, os.O_WRONLY | _O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        for off, size in holes:
            punch(fd, off, size)
    finally:
        os.close(fd)


def remove_segment(path: str) -> None:
    """Remove the segment file at ``path`` if it is there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def try_reclaim(path: str, end: int) -> bool | None:
    """Cut an active segment whose writer is gone back to ``end``.

    ``None`` when its file is gone; ``False`` when a live writer holds it; ``True`` once cut
    (the caller seals it in the index).
    """
    try:
        fd = os.open(path, os.O_RDWR | _O_NONBLOCK | _O_NOFOLLOW | _O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if os.fstat(fd).st_size > end:
            os.ftruncate(fd, end)
        return True
    finally:
        os.close(fd)  # drops the lock too


class ActiveSegment:
    """This instance's segment: appended to at its end, locked while open."""

    def __init__(self, root: str, seg: int, *, sync_dir: bool) -> None:
        self.seg = seg
        self.path = segment_path(root, seg)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:  # the segments directory went away
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.fd = os.open(self.path, flags, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if sync_dir:
                sync_directory(os.path.dirname(self.path))
        except BaseException:
            os.close(self.fd)
            remove_segment(self.path)
            raise
        self.end = 0  # committed end: what the index knows of
        self.tail = 0  # reserved end: batches being written end here

    def reserve(self, size: int) -> int:
        """The offset of a new payload of ``size`` bytes at the tail."""
        off = place(self.tail, size)
        self.tail = off + size
        return off

    def committed(self, end: int) -> None:
        """The index now knows of every byte up to ``end``."""
        self.end = max(self.end, end)

    def give_back(self) -> None:
        """Forget the reservations beyond the committed end (their batch failed), and free
        what they wrote."""
        if self.tail > self.end:
            self.tail = self.end
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.end)

    def close(self) -> None:
        """Stop writing here (drops the lock)."""
        os.close(self.fd)
        self.fd = -1


def sync_directory(path: str) -> None:
    """fsync the directory ``path`` (new entries in it survive a power cut)."""
    dfd = os.open(path, os.O_RDONLY | _O_CLOEXEC | _O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


assert ALIGN % 512 == 0
