"""The store's index: one SQLite database (WAL) that every process sharing the directory uses.

It maps a page's key digest to where its payload lies (segment, offset, length), with the
page's 64-byte trailer (key digest, layout, length, checksum) and its namespaced key. Segments
and the bytes they hold live beside it, so that the capacity is one figure for the whole
directory, whichever process wrote what. Every change is one transaction: a batch's rows with
its segment's new end, an eviction with the holes it leaves. SQLite's journal makes each one
all or nothing under SIGKILL; with ``fsync`` the commit is synced (``synchronous=FULL``).

Blocking: called from worker threads only. One connection for lookups and one for changes,
each behind a lock (a batch is one statement, so they are held for microseconds per page).
"""

from __future__ import annotations

import enum
import errno
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from hicache_async.storage.codec import TRAILER_SIZE

__all__ = ["ALIGN", "Index", "Location", "SegmentState", "footprint", "hole", "place"]

#: Payloads of this size or more start at multiples of it in a segment: a removed page's
#: blocks are freed exactly (a hole punched), and page-cache reads stay aligned. Smaller
#: ones (below the 4 KiB the tier is made for) are packed at 64-byte boundaries.
ALIGN = 4096
SMALL_ALIGN = 64
_CHUNK = 4096  # keys per statement (SQLite allows 32,766 variables)
_BUSY_MS = 60_000
_SQLITE_FULL = 13  # how long a change waits for another process's transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pages (
    digest BLOB PRIMARY KEY, seg INTEGER NOT NULL, off INTEGER NOT NULL,
    len INTEGER NOT NULL, trailer BLOB NOT NULL, seq INTEGER NOT NULL, key TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pages_by_seq ON pages(seq);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT, state INTEGER NOT NULL,
    end_off INTEGER NOT NULL, live INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS holes (seg INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('used', 0), ('seq', 0), ('version', 2);
"""


def place(tail: int, size: int) -> int:
    """Where a payload of ``size`` bytes goes in a segment whose data ends at ``tail``."""
    align = ALIGN if size >= ALIGN else SMALL_ALIGN
    return -(-tail // align) * align


def footprint(size: int) -> int:
    """What a page of ``size`` payload bytes counts against the capacity: the payload and its
    trailer (kept in the index), as a page file of the old layout took."""
    return size + TRAILER_SIZE


def hole(off: int, size: int) -> tuple[int, int]:
    """The range to punch out for a payload at ``off``: its blocks, to the next boundary."""
    align = ALIGN if size >= ALIGN else SMALL_ALIGN
    return off, -(-size // align) * align


class SegmentState(enum.IntEnum):
    """Where a segment file stands."""

    ACTIVE = 0  # a writer appends to it (and holds its flock while alive)
    SEALED = 1  # full, or its writer is gone: read-only, removed once no page lives in it


@dataclass(frozen=True, slots=True)
class Location:
    """Where a page's payload lies, and the trailer that vouches for it."""

    seg: int
    off: int
    len: int
    trailer: bytes


@dataclass(frozen=True, slots=True)
class Row:
    """A page to index."""

    digest: bytes
    key: str
    seg: int
    off: int
    len: int
    trailer: bytes


@dataclass
class Change:
    """What one transaction did beyond its rows: space to free and pages gone."""

    #: ``(segment, offset, bytes)`` to punch out; recorded in ``holes`` until it is done.
    holes: list[tuple[int, int, int]]
    #: Sealed segments no page lives in any more: their files are to be removed.
    dead_segments: list[int]
    #: Namespaced keys of the pages removed (evicted, or not stored after all).
    removed_keys: list[str]
    #: Digests of the batch already indexed by another writer (their new copy is a hole).
    lost: set[bytes]
    #: Digests of the pages removed.
    removed: list[bytes] = field(default_factory=list)


@contextmanager
def _translated() -> Iterator[None]:
    # A full disk is ENOSPC, whichever file filled it: counted as "nospace" like a segment's.
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL:
            raise OSError(errno.ENOSPC, f"the index: {exc}") from exc
        raise


def _chunks(items: Sequence[bytes]) -> Iterator[Sequence[bytes]]:
    for lo in range(0, len(items), _CHUNK):
        yield items[lo : lo + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


class Index:
    """The index database at ``path`` (created when missing)."""

    def __init__(self, path: str, *, durable: bool) -> None:
        self.path = path
        self._read = self._connect(path, durable)
        self._write = self._connect(path, durable)
        self._read_lock = threading.Lock()
        self._write_lock = threading.Lock()
        with self._changing() as db:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)

    @staticmethod
    def _connect(path: str, durable: bool) -> sqlite3.Connection:
        db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=_BUSY_MS / 1000
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives the process's death (SIGKILL), not a power cut; FULL
            # syncs every commit. Either way a power cut never corrupts the database.
            db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        """Close both connections."""
        with self._read_lock, self._write_lock:
            self._read.close()
            self._write.close()

    # -- lookups --------------------------------------------------------------------------

    def lookup(self, digests: Sequence[bytes]) -> dict[bytes, Location]:
        """The locations of those of ``digests`` that are indexed."""
        found: dict[bytes, Location] = {}
        with self._read_lock:
            for part in _chunks(digests):
                rows = self._read.execute(
                    f"SELECT digest, seg, off, len, trailer FROM pages WHERE digest IN "
                    f"({_marks(len(part))})",
                    part,
                )
                for digest, seg, off, size, trailer in rows:
                    found[digest] = Location(seg, off, size, trailer)
        return found

    def present(self, digests: Sequence[bytes]) -> set[bytes]:
        """Those of ``digests`` that are indexed."""
        out: set[bytes] = set()
        with self._read_lock:
            for part in _chunks(digests):
                rows = self._read.execute(
                    f"SELECT digest FROM pages WHERE digest IN ({_marks(len(part))})", part
                )
                out.update(d for (d,) in rows)
        return out

    def figures(self) -> dict[str, int]:
        """Used bytes, pages and segments of the whole directory."""
        with self._read_lock:
            used = self._read.execute("SELECT value FROM meta WHERE name='used'").fetchone()[0]
            pages = self._read.execute("SELECT count(*) FROM pages").fetchone()[0]
            segs = self._read.execute("SELECT count(*) FROM segments").fetchone()[0]
        return {"used_bytes": int(used), "indexed_pages": int(pages), "segments": int(segs)}

    def segments(self) -> list[tuple[int, SegmentState, int, int]]:
        """Every segment: id, state, committed end and live bytes."""
        with self._read_lock:
            rows = self._read.execute("SELECT id, state, end_off, live FROM segments").fetchall()
        return [(i, SegmentState(s), e, live) for i, s, e, live in rows]

    # -- changes --------------------------------------------------------------------------

    @contextmanager
    def _changing(self) -> Iterator[sqlite3.Connection]:
        # One write transaction; BEGIN IMMEDIATE takes the write lock at once, so two
        # processes never deadlock upgrading a read.
        with self._write_lock, _translated():
            db = self._write
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise

    def new_segment(self) -> int:
        """A new active segment's id (never reused: AUTOINCREMENT)."""
        with self._changing() as db:
            cur = db.execute(
                "INSERT INTO segments (state, end_off, live) VALUES (?, 0, 0)",
                (SegmentState.ACTIVE,),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

    def commit_batch(
        self,
        rows: Sequence[Row],
        ends: dict[int, int],
        *,
        touched: Iterable[bytes] = (),
        capacity: int | None = None,
    ) -> Change:
        """Index ``rows`` (keys already indexed are left as they are: their new copy becomes a
        hole), move segments' committed ends to ``ends``, mark ``touched`` pages recently used,
        then evict the least recently used pages until the directory fits ``capacity``."""
        change = Change([], [], [], set())
        with self._changing() as db:
            seq = self._next_seq(db)
            touched = list(touched)
            for part in _chunks(touched):
                db.execute(
                    f"UPDATE pages SET seq=? WHERE digest IN ({_marks(len(part))})", (seq, *part)
                )
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO pages VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(r.digest, r.seg, r.off, r.len, r.trailer, seq, r.key) for r in rows],
            )
            stored = rows
            if db.total_changes - before < len(rows):  # another writer indexed some first
                mine = {(r.digest, r.seg, r.off) for r in rows}
                kept: set[bytes] = set()
                for part in _chunks([r.digest for r in rows]):
                    found = db.execute(
                        f"SELECT digest, seg, off FROM pages WHERE digest IN ({_marks(len(part))})",
                        part,
                    )
                    kept.update(d for d, seg, off in found if (d, seg, off) in mine)
                stored = [r for r in rows if r.digest in kept]
                for r in rows:
                    if r.digest not in kept:
                        change.lost.add(r.digest)
                        change.holes.append((r.seg, *hole(r.off, r.len)))
            live: dict[int, int] = {}
            for r in stored:
                live[r.seg] = live.get(r.seg, 0) + footprint(r.len)
            for seg, size in live.items():
                db.execute("UPDATE segments SET live=live+? WHERE id=?", (size, seg))
            added = sum(live.values())
            for seg, end in ends.items():
                db.execute("UPDATE segments SET end_off=max(end_off, ?) WHERE id=?", (end, seg))
            db.execute("UPDATE meta SET value=value+? WHERE name='used'", (added,))
            if capacity is not None:
                self._evict(db, capacity, change)
            self._record_holes(db, change)
        return change

    def touch(self, digests: Sequence[bytes]) -> None:
        """Mark ``digests`` recently used."""
        if not digests:
            return
        with self._changing() as db:
            seq = self._next_seq(db)
            for part in _chunks(digests):
                db.execute(
                    f"UPDATE pages SET seq=? WHERE digest IN ({_marks(len(part))})", (seq, *part)
                )

    def remove(self, locations: dict[bytes, Location]) -> Change:
        """Drop the pages at ``locations`` (found corrupt or gone), if they are still there."""
        change = Change([], [], [], set())
        with self._changing() as db:
            for digest, loc in locations.items():
                self._drop(db, digest, loc.seg, loc.off, loc.len, change)
            self._record_holes(db, change)
        return change

    def evict(self, capacity: int) -> Change:
        """Evict least recently used pages until the directory fits ``capacity``."""
        change = Change([], [], [], set())
        with self._changing() as db:
            self._evict(db, capacity, change)
            self._record_holes(db, change)
        return change

    def holes_done(self, holes: Sequence[tuple[int, int, int]], segments: Sequence[int]) -> None:
        """Forget ``holes`` (punched) and ``segments`` (their files removed)."""
        if not holes and not segments:
            return
        with self._changing() as db:
            db.executemany("DELETE FROM holes WHERE seg=? AND off=? AND len=?", holes)
            for seg in segments:
                db.execute("DELETE FROM holes WHERE seg=?", (seg,))
                db.execute("DELETE FROM segments WHERE id=?", (seg,))

    def pending_holes(self) -> tuple[list[tuple[int, int, int]], list[int]]:
        """Holes and dead segments a killed process recorded but did not free."""
        with self._read_lock:
            holes = self._read.execute("SELECT seg, off, len FROM holes").fetchall()
            dead = self._read.execute(
                "SELECT id FROM segments WHERE state=? AND live=0", (SegmentState.SEALED,)
            ).fetchall()
        return [(s, o, n) for s, o, n in holes], [i for (i,) in dead]

    def seal(self, seg: int, end: int | None = None) -> bool:
        """Mark ``seg`` sealed (at committed end ``end``, when given); ``True`` when no page
        lives in it (its file is to be removed)."""
        with self._changing() as db:
            if end is not None:
                db.execute("UPDATE segments SET end_off=? WHERE id=?", (end, seg))
            db.execute("UPDATE segments SET state=? WHERE id=?", (SegmentState.SEALED, seg))
            row = db.execute("SELECT live FROM segments WHERE id=?", (seg,)).fetchone()
        return row is not None and row[0] == 0

    def forget_segment(self, seg: int) -> list[str]:
        """Drop ``seg`` and every page in it (its file is gone); their namespaced keys."""
        change = Change([], [], [], set())
        with self._changing() as db:
            rows = db.execute("SELECT digest, off, len FROM pages WHERE seg=?", (seg,)).fetchall()
            for digest, off, size in rows:
                self._drop(db, digest, seg, off, size, change)
            db.execute("DELETE FROM holes WHERE seg=?", (seg,))
            db.execute("DELETE FROM segments WHERE id=?", (seg,))
        return change.removed_keys

    def clear(self) -> list[int]:
        """Drop every page and every sealed segment; the ids of all segments (whose files are
        to be removed or, for live writers' active ones, emptied)."""
        with self._changing() as db:
            ids = [i for (i,) in db.execute("SELECT id FROM segments")]
            db.execute("DELETE FROM pages")
            db.execute("DELETE FROM holes")
            db.execute("UPDATE segments SET live=0")
            db.execute("DELETE FROM segments WHERE state=?", (SegmentState.SEALED,))
            db.execute("UPDATE meta SET value=0 WHERE name='used'")
        return ids

    # -- inside a transaction -------------------------------------------------------------

    @staticmethod
    def _next_seq(db: sqlite3.Connection) -> int:
        # A clock shared by every process: the LRU order of the whole directory.
        db.execute("UPDATE meta SET value=max(value+1, ?) WHERE name='seq'", (time.time_ns(),))
        return int(db.execute("SELECT value FROM meta WHERE name='seq'").fetchone()[0])

    def _evict(self, db: sqlite3.Connection, capacity: int, change: Change) -> None:
        used = int(db.execute("SELECT value FROM meta WHERE name='used'").fetchone()[0])
        while used > capacity:
            victims = db.execute(
                "SELECT digest, seg, off, len FROM pages ORDER BY seq LIMIT 256"
            ).fetchall()
            if not victims:
                break
            for digest, seg, off, size in victims:
                if used <= capacity:
                    break
                self._drop(db, digest, seg, off, size, change)
                used -= footprint(size)

    @staticmethod
    def _drop(
        db: sqlite3.Connection, digest: bytes, seg: int, off: int, size: int, change: Change
    ) -> None:
        row = db.execute(
            "DELETE FROM pages WHERE digest=? AND seg=? AND off=? RETURNING key", (digest, seg, off)
        ).fetchone()
        if row is None:  # gone meanwhile, or moved
            return
        change.removed_keys.append(row[0])
        change.removed.append(digest)
        room = footprint(size)
        db.execute("UPDATE meta SET value=value-? WHERE name='used'", (room,))
        db.execute("UPDATE segments SET live=live-? WHERE id=?", (room, seg))
        change.holes.append((seg, *hole(off, size)))

    @staticmethod
    def _record_holes(db: sqlite3.Connection, change: Change) -> None:
        if not change.holes:
            return
        db.executemany("INSERT INTO holes VALUES (?, ?, ?)", change.holes)
        segs = {seg for seg, _off, _len in change.holes}
        for seg in segs:
            row = db.execute("SELECT state, live FROM segments WHERE id=?", (seg,)).fetchone()
            if row is not None and row[0] == SegmentState.SEALED and row[1] == 0:
                change.dead_segments.append(seg)
