"""The blocking half of the file backend: batches into segments, reads out of them.

A write batch: the keys already indexed are skipped (one lookup); the rest get their trailers
(the xxh3 checksum of each payload) and one reservation at the tail of this instance's active
segment, are written with one ``pwritev`` per segment run, synced when ``fsync`` asks for it,
then indexed in one transaction that also evicts down to the capacity. Only then is the batch
acknowledged. A reader finds a page only once its row is committed, and its row is committed
only after its bytes are written: a page is whole or absent, whoever is killed when.

A read: one lookup for the batch; pages adjacent in a segment are read with one ``preadv``
straight into their host pages, then each is checked against the trailer kept in its row.

Runs in worker threads; writes of one instance are serialised by a lock (they append to one
segment). The async backend (``_backend``) owns the threads and counts what this returns.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import hicache_file._pageio as pageio
from hicache_async.errors import CorruptPageError
from hicache_async.storage import PageBuffer, PageCodec
from hicache_async.storage.codec import key_digest
from hicache_file._checksum import checksum
from hicache_file._index import ALIGN, Change, Index, Location, Row, SegmentState, place
from hicache_file._places import Places
from hicache_file._segments import (
    SEGMENTS,
    ActiveSegment,
    NotASegmentError,
    open_segment,
    punch_at,
    remove_segment,
    segment_path,
    sync_directory,
    try_reclaim,
)

__all__ = ["INDEX_NAME", "Recovered", "Run", "Side", "Store", "WriteResult"]

T = TypeVar("T")
INDEX_NAME = "index.sqlite3"
_SEG_NAME = re.compile(r"([0-9]{12})\.seg")
_LEGACY_SHARD = re.compile(r"[0-9a-f]{2}")
_RUN_BYTES = 4 << 20  # one preadv reads adjacent pages up to this many bytes
_IOV_MAX = 1024
_ZEROS = memoryview(bytes(ALIGN))
_TOUCH_FLUSH = 8192  # pending touches written by a read once this many wait
_PLACES = 1 << 16  # places remembered (about 200 bytes each)


class Side(Generic[T]):
    """Work that whichever thread comes to it first does, while the other goes on with its
    own; :meth:`result` waits only for a thread that is running it. So a helper worker that
    never starts (cancelled, or one thread only) costs nothing but doing it in the caller."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._lock = threading.Lock()
        self._claimed = False
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        """Do it, unless another thread has started it."""
        with self._lock:
            if self._claimed:
                return
            self._claimed = True
        try:
            self._value = self._fn()
        except BaseException as exc:
            self._error = exc
        finally:
            self._done.set()

    def settle(self) -> None:
        """Make sure no thread runs it past this call: wait for one that does, or see that
        none ever starts it."""
        with self._lock:
            claimed, self._claimed = self._claimed, True
        if claimed:
            self._done.wait()

    def result(self) -> T:
        """Its value (done now, unless another thread does it)."""
        self.run()
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


@dataclass
class WriteResult:
    """What one write batch did."""

    stored: list[bool]
    skipped: int = 0
    removed_keys: list[str] = field(default_factory=list)
    error: BaseException | None = None


@dataclass
class Recovered:
    """What the recovery at open found and freed."""

    segments_reclaimed: int = 0  # active segments of dead writers, cut back and sealed
    bytes_cut: int = 0  # uncommitted tails removed from them
    orphan_files: int = 0  # segment files no index row knew of, removed
    holes_punched: int = 0  # space of removed pages a killed process had not freed yet
    legacy: bool = False  # the store still holds pages of the one-file-a-page layout
    index_reset: bool = False  # the index was no database: set aside, started empty


@dataclass(frozen=True, slots=True)
class Run:
    """Pages adjacent in one segment, read with one ``preadv``."""

    seg: int
    off: int
    items: list[int]  # indices into the batch, in offset order


@dataclass
class ReadPlan:
    """A read batch's lookup and what its runs found."""

    digests: list[bytes]
    found: dict[bytes, Location]
    runs: list[Run]
    ok: list[bool]
    bad: dict[int, BaseException] = field(default_factory=dict)  # index -> why it failed
    gone_segments: set[int] = field(default_factory=set)
    repaired: int = 0  # entries that were no segment file, removed


class Store:
    """The segments and the index of one directory, as one instance of the backend uses them."""

    def __init__(
        self,
        root: str,
        *,
        fsync: Literal["none", "file", "dir"],
        segment_bytes: int,
        capacity: int | None,
    ) -> None:
        self.root = root
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.capacity = capacity
        self.index: Index | None = None
        self.legacy = False
        self._active: ActiveSegment | None = None
        self._write_lock = threading.Lock()
        self._touch_lock = threading.Lock()
        self._touched: set[bytes] = set()
        self.places = Places(_PLACES)
        self.reclaimed = 0  # segments of dead writers cut back since open (recovery included)

    # -- open, recover, close -------------------------------------------------------------

    def open(self) -> Recovered:
        """Open the index (creating the store) and recover what killed writers left."""
        os.makedirs(f"{self.root}/{SEGMENTS}", exist_ok=True)
        path = f"{self.root}/{INDEX_NAME}"
        reset = False
        try:
            self.index = Index(path, durable=self.fsync != "none")
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # locked, unreadable: not corrupt
                raise
            # Not a database (any more): its pages cannot be found. Set it aside, and start
            # an empty index; the recovery below removes the segments no row knows.
            os.replace(path, f"{path}.corrupt")
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + suffix)
            self.index = Index(path, durable=self.fsync != "none")
            reset = True
        if self.fsync == "dir":
            sync_directory(self.root)
        recovered = self.recover(orphans=True)
        recovered.index_reset = reset
        recovered.legacy = self.legacy = _has_legacy_shards(self.root)
        return recovered

    def _ix(self) -> Index:
        assert self.index is not None, "the store is not open"
        return self.index

    def recover(self, *, orphans: bool = False) -> Recovered:
        """Reclaim dead writers' active segments, free recorded holes, remove dead segments
        (and, with ``orphans``, segment files the index does not know)."""
        ix, out = self._ix(), Recovered()
        mine = self._active.seg if self._active is not None else None
        files = _segment_files(self.root) if orphans else None
        done: list[int] = []
        for seg, state, end, live in ix.segments():
            path = segment_path(self.root, seg)
            if files is not None:
                files.discard(seg)
            if state is SegmentState.ACTIVE and seg != mine:
                size = _size(path)
                cut = try_reclaim(path, end)
                if cut is None:  # its file is gone: so are its pages
                    ix.forget_segment(seg)
                    continue
                if not cut:
                    continue  # a live writer's
                out.segments_reclaimed += 1
                out.bytes_cut += max(0, (size or 0) - end)
                self.reclaimed += 1
                if ix.seal(seg):
                    remove_segment(path)
                    done.append(seg)
            elif state is SegmentState.SEALED and live == 0:
                remove_segment(path)
                done.append(seg)
        ix.holes_done([], done)
        holes, dead = ix.pending_holes()
        out.holes_punched = len(holes)
        self._free(Change(holes, dead, [], set()))
        for seg in files or ():
            # Written before its row, never: a file without one is a leftover. Listed before
            # the rows were read, so a segment created meanwhile is not in ``files``.
            path = segment_path(self.root, seg)
            if try_reclaim(path, 0):
                remove_segment(path)
                out.orphan_files += 1
        return out

    def close(self) -> None:
        """Seal the active segment, flush touches and close the index (closed whatever fails
        before: what is not sealed now, the next process's recovery seals)."""
        with self._write_lock:
            if self.index is None:
                return
            try:
                with contextlib.suppress(OSError, sqlite3.Error):
                    self._flush_touches()
                if self._active is not None:
                    active, self._active = self._active, None
                    try:
                        with contextlib.suppress(OSError, sqlite3.Error):
                            self._seal(active)
                    finally:
                        if active.fd >= 0:
                            active.close()
            finally:
                self.index.close()
                self.index = None

    # -- writes ---------------------------------------------------------------------------

    def write(
        self,
        keys: Sequence[str],
        buffers: Sequence[PageBuffer],
        codec: PageCodec,
        trailers: Side[list[bytes]] | None = None,
    ) -> WriteResult:
        """Store the pages not indexed yet; see the module docstring. ``trailers`` (every
        page's, in order), when given, may be computed by another thread meanwhile: they are
        needed only for the commit."""
        n = len(keys)
        digests = [key_digest(k) for k in keys]
        result = WriteResult([False] * n)
        if trailers is None:
            trailers = Side(
                lambda: [codec.trailer(d, b) for d, b in zip(digests, buffers, strict=True)]
            )
        try:
            return self._write(keys, buffers, digests, trailers, result)
        finally:
            trailers.settle()  # never return while another thread still reads the host pages

    def _write(
        self,
        keys: Sequence[str],
        buffers: Sequence[PageBuffer],
        digests: list[bytes],
        trailers: Side[list[bytes]],
        result: WriteResult,
    ) -> WriteResult:
        # Outside the lock: two batches in flight hash one while the other is written.
        ix = self._ix()
        present = ix.present(digests)
        todo: list[int] = []
        seen: set[bytes] = set()
        for i, digest in enumerate(digests):
            if digest in present or digest in seen:
                result.stored[i] = True
                result.skipped += 1
            else:
                seen.add(digest)
                todo.append(i)
        if not todo:
            return result
        sizes = [sum(map(len, buffers[i])) for i in todo]
        return self._write_locked(keys, buffers, digests, todo, sizes, trailers, result)

    def _write_locked(
        self,
        keys: Sequence[str],
        buffers: Sequence[PageBuffer],
        digests: list[bytes],
        todo: list[int],
        sizes: list[int],
        trailers: Side[list[bytes]],
        result: WriteResult,
    ) -> WriteResult:
        with self._write_lock:
            ix = self._ix()
            # Reserve: runs of pages per segment, rolling to a new one when full.
            placed: list[tuple[ActiveSegment, int]] = []
            full: list[ActiveSegment] = []
            for size in sizes:
                seg = self._room_for(size, full)
                placed.append((seg, seg.reserve(size)))
            touched_segs = {id(seg): seg for seg, _ in placed}
            try:
                try:
                    written = self._write_runs(todo, buffers, sizes, placed, result)
                except OSError as exc:  # nothing of the batch written
                    result.error = exc
                    written = [False] * len(todo)
                every = trailers.result()
                rows = [
                    Row(digests[i], keys[i], seg.seg, off, size, every[i])
                    for i, size, (seg, off), ok in zip(todo, sizes, placed, written, strict=True)
                    if ok
                ]
                ends: dict[int, int] = {}
                for (seg, off), size, ok in zip(placed, sizes, written, strict=True):
                    if ok:
                        ends[seg.seg] = max(ends.get(seg.seg, 0), off + size)
                if rows and self.fsync != "none":
                    for seg in touched_segs.values():
                        os.fdatasync(seg.fd)
                change = (
                    ix.commit_batch(
                        rows, ends, touched=self._take_touches(), capacity=self.capacity
                    )
                    if rows
                    else None
                )
            except OSError as exc:  # the sync or the index failed: nothing is stored
                for seg in touched_segs.values():
                    seg.give_back()
                result.error = exc
                return result
            except BaseException:
                for seg in touched_segs.values():
                    seg.give_back()
                raise
            for seg in touched_segs.values():
                if seg.seg in ends:
                    seg.committed(ends[seg.seg])
                seg.give_back()  # the tail of pages that failed
            if change is not None:
                for i, ok in zip(todo, written, strict=True):
                    result.stored[i] = ok
                self.places.put(
                    (row.digest, Location(row.seg, row.off, row.len, row.trailer))
                    for row in rows
                    if row.digest not in change.lost
                )
                result.removed_keys = change.removed_keys
                result.skipped += len(change.lost)
                self._free(change)
            for seg in full:
                self._seal(seg)
        return result

    def _room_for(self, size: int, full: list[ActiveSegment]) -> ActiveSegment:
        seg = self._active
        if seg is not None and os.fstat(seg.fd).st_nlink == 0:  # removed from outside
            seg.close()
            seg = self._active = None
        if seg is not None and seg.tail > 0 and place(seg.tail, size) + size > self.segment_bytes:
            full.append(seg)
            seg = None
        if seg is None:
            ix = self._ix()
            if self._active is not None or full:
                self.recover()  # a good moment to reclaim what dead writers left
            seg = self._active = ActiveSegment(
                self.root, ix.new_segment(), sync_dir=self.fsync == "dir"
            )
        return seg

    def _write_runs(
        self,
        todo: list[int],
        buffers: Sequence[PageBuffer],
        sizes: list[int],
        placed: list[tuple[ActiveSegment, int]],
        result: WriteResult,
    ) -> list[bool]:
        # One pwritev per run of pages in one segment; on a failure (ENOSPC), the pages
        # written in full before it are still stored (a prefix: what follows is cut off).
        written = [False] * len(todo)
        start = 0
        while start < len(todo):
            seg = placed[start][0]
            stop = start
            while stop < len(todo) and placed[stop][0] is seg:
                stop += 1
            ok = self._write_chunk(seg, start, stop, todo, buffers, sizes, placed)
            written[start:stop] = ok
            if not all(ok) and result.error is None:
                result.error = OSError(errno.ENOSPC, "No space left on device (short write)")
            start = stop
        return written

    @staticmethod
    def _write_chunk(
        seg: ActiveSegment,
        start: int,
        stop: int,
        todo: list[int],
        buffers: Sequence[PageBuffer],
        sizes: list[int],
        placed: list[tuple[ActiveSegment, int]],
    ) -> list[bool]:
        first = pos = placed[start][1]
        iov: list[memoryview] = []
        for j in range(start, stop):
            off = placed[j][1]
            if off > pos:  # up to the payload's boundary
                iov.append(_ZEROS[: off - pos])
            iov.extend(buffers[todo[j]])
            pos = off + sizes[j]
        done = _pwrite_all(seg.fd, iov, first)
        return [done >= placed[j][1] + sizes[j] - first for j in range(start, stop)]

    def _seal(self, seg: ActiveSegment) -> None:
        ix = self._ix()
        seg.give_back()
        dead = ix.seal(seg.seg, seg.end)
        seg.close()
        if dead:
            remove_segment(seg.path)
            ix.holes_done([], [seg.seg])

    def _free(self, change: Change) -> None:
        # After the transaction that recorded them: punch the holes, remove dead segments.
        dead = set(change.dead_segments)
        by_seg: dict[int, list[tuple[int, int]]] = {}
        for seg, off, size in change.holes:
            if seg not in dead:
                by_seg.setdefault(seg, []).append((off, size))
        for seg, holes in by_seg.items():
            punch_at(segment_path(self.root, seg), holes)
        for seg in dead:
            remove_segment(segment_path(self.root, seg))
        self.places.drop(change.removed)
        self.places.drop_segments(dead)
        self._ix().holes_done(change.holes, sorted(dead))

    # -- reads ----------------------------------------------------------------------------

    def plan(self, keys: Sequence[str]) -> ReadPlan:
        """Look a read batch up, and group its pages into runs."""
        digests = [key_digest(k) for k in keys]
        found, missing = self.places.split(digests)
        if missing:
            fresh = self._ix().lookup(missing)
            found.update(fresh)
            self.places.put(fresh.items())
        by_seg: dict[int, list[tuple[int, int]]] = {}
        for i, digest in enumerate(digests):
            loc = found.get(digest)
            if loc is not None:
                by_seg.setdefault(loc.seg, []).append((loc.off, i))
        runs: list[Run] = []
        for seg, entries in by_seg.items():
            entries.sort()
            items: list[int] = []
            start = end = 0
            for off, i in entries:
                size = found[digests[i]].len
                # Adjacent (up to the padding before a boundary): read with the run.
                if items and not (0 <= off - end < ALIGN and off + size - start <= _RUN_BYTES):
                    runs.append(Run(seg, start, items))
                    items = []
                if not items:
                    start = off
                items.append(i)
                end = off + size
            if items:
                runs.append(Run(seg, start, items))
        return ReadPlan(digests, found, runs, [False] * len(keys))

    def read_run(
        self, plan: ReadPlan, run: Run, buffers: Sequence[PageBuffer], codec: PageCodec
    ) -> None:
        """Read one run into its host pages and check each page (results into ``plan``)."""
        locs = [plan.found[plan.digests[i]] for i in run.items]
        try:
            fd = open_segment(segment_path(self.root, run.seg))
        except NotASegmentError as exc:
            for i in run.items:
                plan.bad[i] = exc
            plan.gone_segments.add(run.seg)
            plan.repaired += pageio.discard_entry(segment_path(self.root, run.seg))
            return
        if fd is None:
            plan.gone_segments.add(run.seg)
            return
        iov: list[memoryview] = []
        scratch = memoryview(bytearray(ALIGN))
        pos = run.off
        for i, loc in zip(run.items, locs, strict=True):
            if loc.off > pos:  # the padding before this payload
                iov.append(scratch[: loc.off - pos])
            iov.extend(buffers[i])
            pos = loc.off + loc.len
        want = pos - run.off
        try:
            got = _pread_all(fd, iov, run.off, want)
        finally:
            os.close(fd)
        for i, loc in zip(run.items, locs, strict=True):
            if got < loc.off + loc.len - run.off:
                plan.bad[i] = CorruptPageError(
                    f"segment {run.seg} ends inside the page at {loc.off} (cut short)"
                )
                continue
            try:
                stored = codec.check_trailer(loc.trailer, plan.digests[i], loc.len)
                if stored != checksum(buffers[i]):
                    raise CorruptPageError(
                        f"the payload at {loc.off} of segment {run.seg} fails its checksum"
                    )
                plan.ok[i] = True
            except CorruptPageError as exc:
                plan.bad[i] = exc

    def settle(
        self, plan: ReadPlan, buffers: Sequence[PageBuffer], codec: PageCodec
    ) -> tuple[list[BaseException], list[str]]:
        """After the runs, for the pages that failed: ask the index where they are now. Gone
        (evicted meanwhile, or their segment removed): a plain miss. Moved (the place known
        here was stale): read again there. Still there: corrupt, dropped from the index so
        the page can be written again. The errors to count, and the namespaced keys of the
        pages dropped."""
        ix = self._ix()
        removed: list[str] = []
        for seg in plan.gone_segments:  # removed from outside (or just now, evicted)
            removed += ix.forget_segment(seg)
        self.places.drop_segments(plan.gone_segments)
        suspects = set(plan.bad) | {
            i
            for i, digest in enumerate(plan.digests)
            if not plan.ok[i]
            and digest in plan.found
            and plan.found[digest].seg in plan.gone_segments
        }
        errors: list[BaseException] = []
        again = ix.lookup([plan.digests[i] for i in suspects])
        drop: dict[bytes, Location] = {}
        retry: list[int] = []
        for i in sorted(suspects):
            digest = plan.digests[i]
            loc, now = plan.found.get(digest), again.get(digest)
            exc = plan.bad.pop(i, None)
            if loc is None:  # a page file of the old layout: removed, so it is written anew
                if exc is not None:
                    errors.append(exc)
                pageio.discard_entry(legacy_path(self.root, digest))
            elif isinstance(exc, NotASegmentError):
                errors.append(exc)
            elif now is None:
                self.places.drop([digest])
            elif now == loc:  # still indexed there: the page is corrupt
                if exc is not None:
                    errors.append(exc)
                drop[digest] = loc
            else:
                plan.found[digest] = now
                self.places.put([(digest, now)])
                retry.append(i)
        for i in retry:
            loc = plan.found[plan.digests[i]]
            self.read_run(plan, Run(loc.seg, loc.off, [i]), buffers, codec)
            exc = plan.bad.pop(i, None)
            if exc is not None:
                errors.append(exc)
                drop[plan.digests[i]] = loc
        if drop:
            change = ix.remove(drop)
            removed += change.removed_keys
            self._free(change)
        return errors, removed

    def note_hits(self, plan: ReadPlan) -> bool:
        """Remember the batch's hits for the LRU order (written with the next batch);
        ``True`` when so many wait that they should be written now (:meth:`flush_touches`)."""
        hits = [plan.digests[i] for i, ok in enumerate(plan.ok) if ok]
        with self._touch_lock:
            self._touched.update(hits)
            return len(self._touched) >= _TOUCH_FLUSH

    def flush_touches(self) -> None:
        """Write the remembered hits into the LRU order."""
        with self._write_lock:
            self._flush_touches()

    def _take_touches(self) -> list[bytes]:
        with self._touch_lock:
            touched, self._touched = self._touched, set()
        return list(touched)

    def _flush_touches(self) -> None:
        self._ix().touch(self._take_touches())

    # -- exists, clear, figures -----------------------------------------------------------

    def leading(self, keys: Sequence[str]) -> int:
        """How many leading ``keys`` are indexed (or, in a legacy store, stored as files)."""
        digests = [key_digest(k) for k in keys]
        present = self._ix().present(digests)
        for i, digest in enumerate(digests):
            if digest not in present and not (
                self.legacy and pageio.is_page_file(legacy_path(self.root, digest))
            ):
                return i
        return len(digests)

    def clear(self) -> None:
        """Remove every page: index rows, segment files, and pages of the old layout."""
        with self._write_lock:
            ix = self._ix()
            self._take_touches()
            ids = ix.clear()
            self.places.clear()
            removed: list[int] = []
            for seg in ids:
                path = segment_path(self.root, seg)
                if self._active is not None and seg == self._active.seg:
                    self._active.close()
                    self._active = None
                    ix.seal(seg)
                    remove_segment(path)
                    removed.append(seg)
                elif try_reclaim(path, 0) is not False:  # no live writer: remove it all
                    remove_segment(path)
                    removed.append(seg)
                else:  # a live writer's: empty what it committed, leave its file
                    size = _size(path) or 0
                    punch_at(path, [(0, size)])
            ix.holes_done([], removed)
            if self.legacy:
                _remove_legacy(self.root)
                self.legacy = False

    def figures(self) -> dict[str, int]:
        """Used bytes, pages and segments of the whole directory."""
        return self._ix().figures()

    def locate(self, key: str) -> tuple[str, int, int] | None:
        """Where a namespaced key's payload lies: segment file, offset, length."""
        loc = self._ix().lookup([key_digest(key)]).get(key_digest(key))
        if loc is None:
            return None
        return segment_path(self.root, loc.seg), loc.off, loc.len

    def read_legacy(self, buffers: Sequence[PageBuffer], plan: ReadPlan, codec: PageCodec) -> None:
        """Read the pages the index missed from the old one-file-a-page layout."""
        for i, digest in enumerate(plan.digests):
            if plan.ok[i] or i in plan.bad or digest in plan.found:
                continue
            try:
                plan.ok[i] = pageio.read_page(
                    legacy_path(self.root, digest), digest, buffers[i], codec
                )
            except CorruptPageError as exc:
                plan.bad[i] = exc


def legacy_path(root: str, digest: bytes) -> str:
    """Where the old layout kept a page: ``{root}/{d[0:2]}/{d[2:4]}/{d}.kv``."""
    d = digest.hex()
    return f"{root}/{d[:2]}/{d[2:4]}/{d}.kv"


def _has_legacy_shards(root: str) -> bool:
    with os.scandir(root) as entries:
        return any(
            _LEGACY_SHARD.fullmatch(e.name) and e.is_dir(follow_symlinks=False) for e in entries
        )


def _remove_legacy(root: str) -> None:
    with os.scandir(root) as entries:
        shards = [e.path for e in entries if _LEGACY_SHARD.fullmatch(e.name)]
    for shard in shards:
        pageio.discard_entry(shard)


def _segment_files(root: str) -> set[int]:
    try:
        with os.scandir(f"{root}/{SEGMENTS}") as entries:
            return {int(m.group(1)) for e in entries if (m := _SEG_NAME.fullmatch(e.name))}
    except FileNotFoundError:
        return set()


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _pwrite_all(fd: int, iov: list[memoryview], off: int) -> int:
    """Bytes written from ``iov`` at ``off``: all of them, or fewer when the disk filled."""
    done, pending = 0, iov
    while pending:
        try:
            n = pageio._pwritev(fd, pending[:_IOV_MAX], off + done)
        except OSError:
            if done == 0:
                raise
            return done
        if n <= 0:
            return done
        done += n
        pending = pageio._advance(pending, n)
    return done


def _pread_all(fd: int, iov: list[memoryview], off: int, want: int) -> int:
    if len(iov) <= _IOV_MAX:
        got = pageio._preadv(fd, iov, off)
        if got == want:
            return got
    return pageio._readv_full(fd, iov, want, off)
