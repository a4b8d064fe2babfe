"""The survey: one walk of the store when a backend opens, in a thread of its own.

It removes the temp files killed writers left (see ``_tempfiles``) and, for a capacity
index, lists the page files with their sizes. It reads each shard directory once (65,536 at
most, one ``scandir`` each: linear in the store, ~0.7 s for 200,000 pages here) and stats
only the files it lists or removes. Without a capacity index nothing waits for it: reads and
writes go on meanwhile, and the backend folds its counts in once it is done; with one, the
calls wait for it (the LRU order needs every page file), as they waited for the index scan
before. The thread is the backend's: ``stop()`` ends the walk at the next directory, and the
backend joins it when it closes.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio

from hicache_file._tempfiles import TEMP_SUFFIX, is_stale

__all__ = ["Survey", "SurveyResult"]

_SHARD = re.compile(r"[0-9a-f]{2}")
_PAGE = re.compile(r"[0-9a-f]{32}\.kv")
# Only our own temp names: a ``path`` pointed at a directory with other files loses none.
_TEMP = re.compile(r"[0-9a-f]{32}\.kv\..+" + re.escape(TEMP_SUFFIX))


@dataclass
class SurveyResult:
    """What one walk found and removed."""

    swept_files: int = 0
    swept_bytes: int = 0
    #: Temp files that were stale but could not be removed (permissions).
    sweep_failures: int = 0
    #: Sizes of the page files by path, oldest first (when sizes were asked for).
    pages: OrderedDict[str, int] = field(default_factory=OrderedDict)
    page_bytes: int = 0
    error: BaseException | None = None


class Survey:
    """A walk of the store at ``root`` in a thread; ``sizes`` also lists the page files."""

    def __init__(self, root: str, *, sizes: bool) -> None:
        self.root = root
        self.sizes = sizes
        self.result = SurveyResult()
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hicache-file-survey")

    @property
    def done(self) -> bool:
        """Whether the walk has ended (finished, stopped or failed)."""
        return self._finished.is_set()

    def start(self) -> None:
        """Start the walk."""
        self._thread.start()

    def stop(self) -> None:
        """End the walk at the next directory."""
        self._stop.set()

    async def wait(self) -> None:
        """Wait for the walk's thread to return."""
        if self._thread.ident is not None:
            # Only a join: a cancelled caller may leave it behind (it returns with the walk).
            await anyio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)

    def _run(self) -> None:
        found: list[tuple[float, str, int]] = []
        try:
            now = time.time()
            for leaf in self._leaves():
                self._scan(leaf, now, found)
            # Built here, not on the loop: a million entries take a good part of a second.
            found.sort()
            self.result.pages = OrderedDict((path, size) for _mtime, path, size in found)
            self.result.page_bytes = sum(self.result.pages.values())
        except Exception as exc:  # handed to the backend, which counts and logs it
            self.result.error = exc
        finally:
            self._finished.set()

    def _leaves(self) -> Iterator[str]:
        tops = _shards(self.root)
        # From a random start: processes too short-lived to finish the walk still sweep it all.
        start = secrets.randbelow(len(tops)) if tops else 0
        for top in tops[start:] + tops[:start]:
            for leaf in _shards(top):
                if self._stop.is_set():
                    return
                yield leaf

    def _scan(self, leaf: str, now: float, found: list[tuple[float, str, int]]) -> None:
        try:
            with os.scandir(leaf) as entries:
                for entry in entries:
                    if _TEMP.fullmatch(entry.name):
                        self._sweep(entry, now)
                    elif self.sizes and _PAGE.fullmatch(entry.name):
                        _list(entry, found)
        except (FileNotFoundError, NotADirectoryError):  # removed or replaced meanwhile
            return

    def _sweep(self, entry: os.DirEntry[str], now: float) -> None:
        try:
            st = entry.stat(follow_symlinks=False)
            if not is_stale(entry.name, st.st_mtime, now):
                return
            os.unlink(entry.path)
        except FileNotFoundError:  # renamed into place by its writer meanwhile
            return
        except OSError:
            self.result.sweep_failures += 1
            return
        self.result.swept_files += 1
        self.result.swept_bytes += st.st_size


def _list(entry: os.DirEntry[str], found: list[tuple[float, str, int]]) -> None:
    try:
        if not entry.is_file(follow_symlinks=False):
            return
        st = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return
    found.append((st.st_mtime, entry.path, st.st_size))


def _shards(path: str) -> list[str]:
    # The shard directories right below ``path`` (two hex digits, real directories).
    try:
        with os.scandir(path) as entries:
            return [
                e.path
                for e in entries
                if _SHARD.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
            ]
    except (FileNotFoundError, NotADirectoryError):
        return []
