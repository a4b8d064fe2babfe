"""Prefetch (L3 -> L2): bring the pages of a prompt that L1 and L2 miss from storage.

reserve: ask L3 how many leading pages it holds (``batch_exists``), check the in-flight
capacity, reserve host pages for exactly those (a :class:`_Held`). move: ``batch_get_v1`` in
batches, in prefix order, stopping at the first page that did not arrive. commit: insert the
leading pages that arrived as host-only nodes, emit ``BlockStored(CPU_PINNED)``, free the rest.
rollback (the caller's cancellation): free every reserved page.

The deadline starts when :meth:`Prefetcher.fetch` is called and bounds every step that waits on
L3 (the existence check and the reads); a prefetch given none is bounded by ``max_wait_s``.
:meth:`PrefetchControl.terminate` cuts whichever of those steps is running, at once. Either
keeps the pages that fully arrived. A batch cut while a backend's worker thread is stuck in it
(a blocking call that does not return) does not wait for that thread
(:func:`~hicache_async.storage.threads.leave_stuck_threads`): its pages are never handed out and
stay reserved, counted in ``inflight_pages``, until the thread returns. Any other failure (an
exception a backend did not translate, a hashing error) ends the prefetch as a miss counted in
``transitions[prefetch].failures``; only a broken index (``IndexStateError``) and a broken
tensor-parallel group (``AgreementError``) propagate.

With tensor parallelism every prefetch makes two tagged agreement rounds whatever this rank
holds: how far the prompt's prefix reaches on every rank (its tree, then L3), then how far it
reaches once the pages arrived. Counts are absolute (pages from the prompt's start), because
ranks' trees need not hold the same prefix (backups and evictions land at different times);
each rank fetches from where its own tree ends, and keeps pages only up to where every rank got.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import anyio
import torch

from hicache_async.errors import IndexStateError
from hicache_async.events import BlockStored, EventHub, StorageMedium
from hicache_async.metrics import Counters, Transition
from hicache_async.radix import TOKEN_BYTES, MatchResult, RadixKey, RadixTree, hash_pages
from hicache_async.storage import HiCacheStorage
from hicache_async.storage.threads import Straggler, leave_stuck_threads
from hicache_async.tiers._events import token_list
from hicache_async.tiers._paged import leading
from hicache_async.tiers._pending import Pending
from hicache_async.tiers.consensus import AgreementError
from hicache_async.tiers.host import HostTier

__all__ = ["PrefetchControl", "PrefetchOutcome", "PrefetchResult", "Prefetcher"]

_REACH, _ARRIVED = 1, 2  # a prefetch's two agreement rounds (the step bits of its tag)

log = logging.getLogger(__name__)


class PrefetchOutcome(enum.Enum):
    """How a prefetch ended."""

    SKIPPED = "skipped"  # shorter than prefetch_threshold, or nothing left to fetch
    STARTED = "started"  # best_effort: running in the background; load() takes what arrived
    MISS = "miss"  # L3 holds none of the pages
    REFUSED = "refused"  # in-flight prefetches hold too many host pages, or L2 is full
    COMPLETED = "completed"  # every page L3 had arrived
    PARTIAL = "partial"  # stopped early (a failed page, or terminated by the caller)
    TIMED_OUT = "timed_out"  # the deadline passed; the arrived prefix was kept
    FAILED = "failed"  # an unexpected error: a miss, counted in transitions[prefetch].failures


@dataclass(frozen=True, slots=True)
class PrefetchResult:
    """What a prefetch brought: pages inserted into the tree as host-resident."""

    outcome: PrefetchOutcome
    found_pages: int = 0  # pages this rank asked L3 for (every rank can reach that far)
    arrived_pages: int = 0  # pages inserted (every rank has them)


class PrefetchControl:
    """Lets another task end a running prefetch early, keeping the pages that arrived
    (``best_effort``: the request moves on and takes what is there)."""

    def __init__(self) -> None:
        self.terminated = False
        self._scope: anyio.CancelScope | None = None

    def terminate(self) -> None:
        """Stop now, wherever the prefetch is (the existence check or a read): the batch in
        flight is abandoned, earlier batches are kept. Tensor-parallel rounds still run."""
        self.terminated = True
        if self._scope is not None:
            self._scope.cancel()

    @contextmanager
    def _step(self, deadline: float) -> Iterator[anyio.CancelScope]:
        """A step that waits on L3: cut at ``deadline`` (anyio's clock) or by :meth:`terminate`,
        whichever comes first; ``scope.cancelled_caught`` tells whether it was cut."""
        with anyio.CancelScope(deadline=deadline) as scope:
            self._scope = scope
            if self.terminated:
                scope.cancel()
            try:
                yield scope
            finally:
                self._scope = None


def _nothing_to_keep(straggler: Straggler) -> None:
    """The owner of a call that gives its threads no memory of ours (counted all the same)."""


class _Held:
    """The host pages one prefetch reserved, from reserve to commit or rollback.

    Only its methods change what it holds, and ``Prefetcher.inflight_pages`` is the sum over the
    live ones, so the count cannot drift from the pages: :meth:`take` hands the leading pages to
    the commit, :meth:`release` frees the rest (sync, idempotent); pages that a worker thread
    left behind may still write (:meth:`quarantine`) are freed only once every such thread
    returned, and the reservation stays counted until then.
    """

    def __init__(
        self,
        live: set[_Held],
        quarantines: Pending,
        host: HostTier,
        slots: torch.Tensor,
        page_size: int,
    ) -> None:
        self._live, self._quarantines, self._host = live, quarantines, host
        self.slots, self._size = slots, page_size
        self.pages = slots.numel() // page_size  # still held: not taken, not yet freed
        self._taken = 0  # leading pages handed to the commit
        self._released = False
        # (first, end) page spans kept for threads left behind -> whether they still run; a
        # span stays listed once back, so release() never frees it a second time.
        self._kept: dict[tuple[int, int], bool] = {}
        live.add(self)

    def take(self, n_pages: int) -> torch.Tensor:
        """The slots of the leading ``n_pages`` pages, no longer held here (the caller inserts
        or frees them)."""
        assert not self._taken
        assert not self._released
        assert all(n_pages <= first for first, _ in self._kept)  # kept pages never go out
        self._taken = n_pages
        self.pages -= n_pages
        return self.slots[: n_pages * self._size]

    def quarantine(self, first: int, end: int, straggler: Straggler) -> None:
        """Keep pages ``first:end`` (a batch whose threads were left behind, which may still
        write them) until those threads return."""
        span = (first, end)
        assert span not in self._kept  # one call per batch
        self._kept[span] = True
        self._quarantines.add()
        straggler.on_return(partial(self._returned, span))

    def release(self) -> None:
        """Free every page not taken and not kept (commit's rest, or the rollback)."""
        if self._released:
            return
        self._released = True
        size, start = self._size, self._taken
        parts = []
        for first, end in sorted(self._kept):
            parts.append(self.slots[start * size : first * size])
            start = max(start, end)
        parts.append(self.slots[start * size :])
        free = torch.cat(parts)
        self.pages -= free.numel() // size
        if not any(self._kept.values()):
            self._live.discard(self)
        self._host.free(free)

    def _returned(self, span: tuple[int, int]) -> None:  # on the loop, once the threads are back
        self._kept[span] = False
        self._quarantines.done()
        first, end = span
        self.pages -= end - first
        if self._released and not any(self._kept.values()):
            self._live.discard(self)
        self._host.free(self.slots[first * self._size : end * self._size])


class Prefetcher:
    """Runs prefetches for sessions; ``inflight_pages`` bounds what they hold together.

    ``max_wait_s`` bounds a prefetch called without a deadline of its own (``wait_complete``,
    and ``best_effort``'s background fetch, which ``load()`` normally ends first).
    """

    def __init__(
        self,
        tree: RadixTree,
        host: HostTier,
        storage: HiCacheStorage,
        counters: Counters,
        hub: EventHub,
        *,
        threshold_tokens: int,
        capacity_pages: int,
        batch_pages: int = 64,
        max_wait_s: float = 30.0,  # HiCacheConfig.prefetch_wait_complete_timeout's default
        agree: Callable[[int, Sequence[int]], Awaitable[list[int] | None]] | None = None,
    ) -> None:
        self.tree, self.host, self.storage = tree, host, storage
        self.counters, self.hub = counters, hub
        self.threshold_tokens = threshold_tokens
        self.capacity_pages = capacity_pages
        self.batch_pages = batch_pages
        self.max_wait_s = max_wait_s
        self._agree = agree
        self._held: set[_Held] = set()  # live reservations (quarantined ones included)
        self.running = Pending()  # prefetches under way (a drain waits for them)
        # Page ranges kept for worker threads left behind (see _Held); they come back when the
        # threads return. A drain does not wait for them: such a thread may never return.
        self.quarantined = Pending()
        self._logged: set[str] = set()

    @property
    def inflight_pages(self) -> int:
        """Host pages reserved by prefetches right now, quarantined ones included."""
        return sum(held.pages for held in self._held)

    def _failed(self, exc: Exception) -> PrefetchResult:
        """An unexpected error (a backend's exception that is not a miss, a hashing error):
        the request gets a miss, the failure is counted and its first of a kind logged."""
        self.counters.transitions[Transition.PREFETCH].failures += 1
        kind = type(exc).__name__
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(
                "prefetch failed (%s: %s); counted as a miss, further %s are not logged",
                kind,
                exc,
                kind,
                exc_info=exc,
            )
        return PrefetchResult(PrefetchOutcome.FAILED)

    async def _agreed(self, tag: int, values: Sequence[int]) -> list[int] | None:
        """The minimum over tensor-parallel ranks (``values`` alone without them); ``None``
        when the ranks were at different rounds."""
        return list(values) if self._agree is None else await self._agree(tag, values)

    def _after_reach(self, agreed: list[int] | None, total: int) -> PrefetchOutcome | None:
        """What the reach round decided, the same on every rank (it reads only agreed values):
        ``SKIPPED`` (unpaired, or under the threshold, which under tensor parallelism applies
        to the rank whose tree holds the least), ``MISS`` (no rank can extend the prefix
        every rank holds), or None: on to the arrival round."""
        if agreed is None:
            return PrefetchOutcome.SKIPPED
        reach, least = agreed
        if (total - least) * self.tree.page_size < max(self.threshold_tokens, 1):
            return PrefetchOutcome.SKIPPED
        return PrefetchOutcome.MISS if reach <= least else None

    async def _reach_nothing(self, tag: int, held: int, total: int) -> None:
        """Cut before the reach round (an error or a cancellation on this rank): make the
        rounds the other ranks still make, reporting nothing beyond this rank's tree."""
        with anyio.CancelScope(shield=True):
            agreed = await self._agreed(tag | _REACH, [held, held])
            if self._after_reach(agreed, total) is None:
                await self._agreed(tag | _ARRIVED, [held])

    async def _arrive_nothing(self, tag: int, held: int) -> None:
        """Cut between the two rounds: make the arrival round, reporting nothing arrived."""
        with anyio.CancelScope(shield=True):
            await self._agreed(tag | _ARRIVED, [held])

    def suffix_keys(self, key: RadixKey, match: MatchResult) -> tuple[int, str | None, list[str]]:
        """Tokens already matched, the hash of the last matched page, and the L3 keys of the
        whole pages after them."""
        matched = match.device_hit_length + match.host_hit_length
        size = self.tree.page_size
        parent_hash = None
        if matched:
            hashes = self.tree.page_hashes(match.last_host_node)
            parent_hash = hashes[-1] if hashes else None
        data = key.data[matched * TOKEN_BYTES : len(key) // size * size * TOKEN_BYTES]
        extra = key.extra_key if matched == 0 else None
        return matched, parent_hash, hash_pages(data, size, extra, parent_hash)

    async def fetch(
        self,
        key: RadixKey,
        match: MatchResult,
        *,
        deadline_s: float | None = None,
        control: PrefetchControl | None = None,
        tag: int = 0,
    ) -> PrefetchResult:
        """Prefetch the pages of ``key`` after ``match`` (whose nodes the caller keeps locked).

        ``deadline_s`` (``max_wait_s`` when None) counts from this call and bounds every wait
        on L3; at the deadline, or when ``control`` terminates it, the pages that fully arrived
        are kept. Cancelling the caller instead rolls everything back. An unexpected error is a
        ``FAILED`` result (a miss), never an exception, except ``IndexStateError`` and
        ``AgreementError``. ``tag`` names the request in tensor-parallel rounds (see
        :func:`~hicache_async.tiers.consensus.round_tag`; its step bits must be 0).
        """
        bound = self.max_wait_s if deadline_s is None else deadline_s
        deadline = anyio.current_time() + bound  # the whole prefetch, from here
        control = control if control is not None else PrefetchControl()
        try:
            matched, parent_hash, keys = self.suffix_keys(key, match)
        except IndexStateError:
            raise
        except Exception as exc:  # e.g. a key the page hashing cannot encode
            return self._failed(exc)
        short = len(keys) * self.tree.page_size < max(self.threshold_tokens, 1)
        if short and self._agree is None:  # with ranks, the threshold is agreed (_after_reach)
            self.counters.prefetch_skipped += 1
            return PrefetchResult(PrefetchOutcome.SKIPPED)
        # The new pages hang below the matched path: keep it in the tree until they do.
        self.tree.lock(match.last_device_node)
        self.tree.lock_host(match.last_host_node)
        self.running.add()
        try:
            return await self._fetch(key, matched, parent_hash, keys, deadline, control, tag)
        except (IndexStateError, AgreementError):
            raise  # a broken index or group: nothing here can repair it
        except Exception as exc:  # what it reserved was rolled back on the way out
            return self._failed(exc)
        finally:
            self.tree.unlock_host(match.last_host_node)
            self.tree.unlock(match.last_device_node)
            self.running.done()

    async def _fetch(
        self,
        key: RadixKey,
        matched: int,
        parent_hash: str | None,
        keys: list[str],
        deadline: float,
        control: PrefetchControl,
        tag: int,
    ) -> PrefetchResult:
        held = matched // self.tree.page_size  # pages this rank's tree holds already
        total = held + len(keys)  # the prompt's whole pages: the same on every rank
        reached = False  # the reach round was made
        try:
            found = 0
            cut = False  # the existence check ran out of time or was terminated: found none
            if keys:
                # An existence check writes no page: a thread stuck in it has nothing to keep.
                with (
                    control._step(deadline) as scope,
                    leave_stuck_threads(_nothing_to_keep, self.storage.stats),
                ):
                    found = await self.storage.batch_exists(keys)
                cut = scope.cancelled_caught
            agreed = await self._agreed(tag | _REACH, [held + found, held])
            reached = True
            outcome = self._after_reach(agreed, total)
            if outcome is PrefetchOutcome.SKIPPED:
                self.counters.prefetch_skipped += 1
                return PrefetchResult(outcome)
            self.counters.prefetch_issued += 1
            if outcome is PrefetchOutcome.MISS:
                return self._stopped(control) if cut else PrefetchResult(outcome)
            assert agreed is not None
            share = keys[: max(0, agreed[0] - held)]  # none when this rank's tree reaches
            return await self._bring(key, matched, parent_hash, share, deadline, control, tag)
        except AgreementError:
            raise  # the group is broken: no more rounds
        except BaseException:
            if self._agree is not None and not reached:  # (_bring makes its own round)
                await self._reach_nothing(tag, held, total)
            raise

    def _stopped(self, control: PrefetchControl) -> PrefetchResult:
        """Cut in the existence check: nothing was fetched."""
        if control.terminated:
            self.counters.prefetch_partial += 1
            return PrefetchResult(PrefetchOutcome.PARTIAL)
        self.counters.prefetch_timed_out += 1
        return PrefetchResult(PrefetchOutcome.TIMED_OUT)

    async def _bring(
        self,
        key: RadixKey,
        matched: int,
        parent_hash: str | None,
        keys: list[str],
        deadline: float,
        control: PrefetchControl,
        tag: int,
    ) -> PrefetchResult:
        """Fetch this rank's share of the agreed reach (``keys``, empty when its own tree
        reaches that far), agree how far every rank got, keep that much."""
        held = matched // self.tree.page_size
        found = len(keys)
        pages = None
        if keys and self.inflight_pages + found <= self.capacity_pages:
            slots = self.host.reserve(found)
            if slots is not None:
                pages = _Held(self._held, self.quarantined, self.host, slots, self.tree.page_size)
        refused = bool(keys) and pages is None
        if refused:  # still agrees below, reporting nothing arrived
            self.counters.prefetch_refused += 1
        arrived, timed_out = 0, False
        if pages is not None:
            try:
                arrived, timed_out = await self._move(keys, pages, deadline, control)
            except BaseException:
                pages.release()
                if self._agree is not None:
                    await self._arrive_nothing(tag, held)
                raise
        try:
            agreed = await self._agreed(tag | _ARRIVED, [held + arrived])
        except BaseException:
            if pages is not None:
                pages.release()
            raise
        arrived = min(arrived, max(0, agreed[0] - held)) if agreed is not None else 0
        if pages is not None:
            self._commit(key, matched, parent_hash, keys, pages, arrived)
        if refused:
            return PrefetchResult(PrefetchOutcome.REFUSED, found)
        if not found:  # this rank's tree reached as far as every rank can
            return PrefetchResult(PrefetchOutcome.SKIPPED)
        if timed_out:
            self.counters.prefetch_timed_out += 1
            outcome = PrefetchOutcome.TIMED_OUT
        elif arrived < found:
            self.counters.prefetch_partial += 1
            outcome = PrefetchOutcome.PARTIAL
        else:
            self.counters.prefetch_completed += 1
            outcome = PrefetchOutcome.COMPLETED
        return PrefetchResult(outcome, found, arrived)

    async def _move(
        self, keys: list[str], pages: _Held, deadline: float, control: PrefetchControl
    ) -> tuple[int, bool]:
        """Fetch in prefix order; returns (leading pages arrived, whether the deadline hit)."""
        size = self.tree.page_size
        arrived = 0
        start = time.perf_counter()
        stats = self.storage.stats
        with control._step(deadline) as scope:
            while arrived < len(keys):
                batch = keys[arrived : arrived + self.batch_pages]
                part = pages.slots[arrived * size : (arrived + len(batch)) * size]
                # A thread stuck in this batch is left behind; its pages wait for it in `pages`.
                stuck = partial(pages.quarantine, arrived, arrived + len(batch))
                with leave_stuck_threads(stuck, stats):
                    got = leading(await self.storage.batch_get_v1(batch, part))
                arrived += got
                if got < len(batch):
                    break
        pool = self.host.pool
        self.counters.transitions[Transition.PREFETCH].add(
            arrived, arrived * pool.bytes_per_page, time.perf_counter() - start
        )
        return arrived, scope.cancelled_caught and not control.terminated

    def _commit(
        self,
        key: RadixKey,
        matched: int,
        parent_hash: str | None,
        keys: list[str],
        pages: _Held,
        arrived: int,
    ) -> None:
        size = self.tree.page_size
        end = matched + arrived * size
        slots = pages.take(arrived)
        pages.release()  # the pages that did not arrive (a stuck thread's wait for it)
        if arrived:
            full = torch.cat([torch.zeros(matched, dtype=torch.int64), slots[: arrived * size]])
            present = self.tree.insert_host(
                RadixKey(key.data[: end * TOKEN_BYTES], key.extra_key), full
            )
        else:
            present = matched
        # Pages another request inserted meanwhile go back.
        dup = max(0, min(present, end) - matched)
        self.host.free(slots[:dup])
        new_from = dup // size
        if arrived > new_from and self.hub.active:
            tokens = token_list(key.data[(matched + dup) * TOKEN_BYTES : end * TOKEN_BYTES])
            parent = keys[new_from - 1] if new_from else parent_hash
            self.hub.emit(
                [
                    BlockStored(
                        tuple(keys[new_from:arrived]),
                        parent,
                        tuple(tokens),
                        size,
                        StorageMedium.CPU_PINNED,
                        key.extra_key,
                    )
                ]
            )
