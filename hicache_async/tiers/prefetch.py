"""Prefetch (L3 -> L2): bring the pages of a prompt that L1 and L2 miss from storage.

reserve: ask L3 how many leading pages it holds (``batch_exists``), check the in-flight
capacity, reserve host pages for exactly those. move: ``batch_get_v1`` in batches, in prefix
order, stopping at the first page that did not arrive; the caller's deadline or termination
cancels the batch in flight (the backend waits for its threads before it returns, so no thread
still writes a page we free). commit: insert the leading pages that arrived as host-only nodes,
emit ``BlockStored(CPU_PINNED)``, free the rest. rollback (an error or the caller's
cancellation): free every reserved page.

With tensor parallelism every prefetch makes two tagged agreement rounds whatever this rank
holds: how far the prompt's prefix reaches on every rank (its tree, then L3), then how far it
reaches once the pages arrived. Counts are absolute (pages from the prompt's start), because
ranks' trees need not hold the same prefix (backups and evictions land at different times);
each rank fetches from where its own tree ends, and keeps pages only up to where every rank got.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
import torch

from hicache_async.events import BlockStored, EventHub, StorageMedium
from hicache_async.metrics import Counters, Transition
from hicache_async.radix import TOKEN_BYTES, MatchResult, RadixKey, RadixTree, hash_pages
from hicache_async.storage import HiCacheStorage
from hicache_async.tiers._events import token_list
from hicache_async.tiers._paged import leading
from hicache_async.tiers._pending import Pending
from hicache_async.tiers.consensus import AgreementError
from hicache_async.tiers.host import HostTier

__all__ = ["PrefetchControl", "PrefetchOutcome", "PrefetchResult", "Prefetcher"]

_REACH, _ARRIVED = 1, 2  # a prefetch's two agreement rounds (the step bits of its tag)


class PrefetchOutcome(enum.Enum):
    """How a prefetch ended."""

    SKIPPED = "skipped"  # shorter than prefetch_threshold, or nothing left to fetch
    STARTED = "started"  # best_effort: running in the background; load() takes what arrived
    MISS = "miss"  # L3 holds none of the pages
    REFUSED = "refused"  # in-flight prefetches hold too many host pages, or L2 is full
    COMPLETED = "completed"  # every page L3 had arrived
    PARTIAL = "partial"  # stopped early (a failed page, or terminated by the caller)
    TIMED_OUT = "timed_out"  # the deadline passed; the arrived prefix was kept


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
        """Stop fetching now; the batch in flight is abandoned, earlier batches are kept."""
        self.terminated = True
        if self._scope is not None:
            self._scope.cancel()


class Prefetcher:
    """Runs prefetches for sessions; ``inflight_pages`` bounds what they hold together."""

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
        agree: Callable[[int, Sequence[int]], Awaitable[list[int] | None]] | None = None,
    ) -> None:
        self.tree, self.host, self.storage = tree, host, storage
        self.counters, self.hub = counters, hub
        self.threshold_tokens = threshold_tokens
        self.capacity_pages = capacity_pages
        self.batch_pages = batch_pages
        self._agree = agree
        self.inflight_pages = 0
        self.running = Pending()  # prefetches under way (a drain waits for them)

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

        At ``deadline_s`` or when ``control`` terminates it, the pages that fully arrived are
        kept. Cancelling the caller instead rolls everything back. ``tag`` names the request
        in tensor-parallel rounds (see :func:`~hicache_async.tiers.consensus.round_tag`; its
        step bits must be 0).
        """
        matched, parent_hash, keys = self.suffix_keys(key, match)
        short = len(keys) * self.tree.page_size < max(self.threshold_tokens, 1)
        if short and self._agree is None:  # with ranks, the threshold is agreed (_after_reach)
            self.counters.prefetch_skipped += 1
            return PrefetchResult(PrefetchOutcome.SKIPPED)
        # The new pages hang below the matched path: keep it in the tree until they do.
        self.tree.lock(match.last_device_node)
        self.tree.lock_host(match.last_host_node)
        self.running.add()
        try:
            return await self._fetch(key, matched, parent_hash, keys, deadline_s, control, tag)
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
        deadline_s: float | None,
        control: PrefetchControl | None,
        tag: int,
    ) -> PrefetchResult:
        held = matched // self.tree.page_size  # pages this rank's tree holds already
        total = held + len(keys)  # the prompt's whole pages: the same on every rank
        reached = False  # the reach round was made
        try:
            found = await self.storage.batch_exists(keys) if keys else 0
            agreed = await self._agreed(tag | _REACH, [held + found, held])
            reached = True
            outcome = self._after_reach(agreed, total)
            if outcome is PrefetchOutcome.SKIPPED:
                self.counters.prefetch_skipped += 1
                return PrefetchResult(outcome)
            self.counters.prefetch_issued += 1
            if outcome is PrefetchOutcome.MISS:
                return PrefetchResult(outcome)
            assert agreed is not None
            share = keys[: max(0, agreed[0] - held)]  # none when this rank's tree reaches
            return await self._bring(key, matched, parent_hash, share, deadline_s, control, tag)
        except AgreementError:
            raise  # the group is broken: no more rounds
        except BaseException:
            if self._agree is not None and not reached:  # (_bring makes its own round)
                await self._reach_nothing(tag, held, total)
            raise

    async def _bring(
        self,
        key: RadixKey,
        matched: int,
        parent_hash: str | None,
        keys: list[str],
        deadline_s: float | None,
        control: PrefetchControl | None,
        tag: int,
    ) -> PrefetchResult:
        """Fetch this rank's share of the agreed reach (``keys``, empty when its own tree
        reaches that far), agree how far every rank got, keep that much."""
        held = matched // self.tree.page_size
        found = len(keys)
        slots = None
        if keys and self.inflight_pages + found <= self.capacity_pages:
            slots = self.host.reserve(found)
        refused = bool(keys) and slots is None
        if refused:  # still agrees below, reporting nothing arrived
            self.counters.prefetch_refused += 1
        arrived, timed_out = 0, False
        if slots is not None:
            self.inflight_pages += found
            try:
                arrived, timed_out = await self._move(keys, slots, deadline_s, control)
            except BaseException:
                self.inflight_pages -= found
                self.host.free(slots)
                if self._agree is not None:
                    await self._arrive_nothing(tag, held)
                raise
            self.inflight_pages -= found
        try:
            agreed = await self._agreed(tag | _ARRIVED, [held + arrived])
        except BaseException:
            if slots is not None:
                self.host.free(slots)
            raise
        arrived = min(arrived, max(0, agreed[0] - held)) if agreed is not None else 0
        if slots is not None:
            self._commit(key, matched, parent_hash, keys, slots, arrived)
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
        self,
        keys: list[str],
        slots: torch.Tensor,
        deadline_s: float | None,
        control: PrefetchControl | None,
    ) -> tuple[int, bool]:
        """Fetch in prefix order; returns (leading pages arrived, whether the deadline hit)."""
        size = self.tree.page_size
        arrived = 0
        start = time.perf_counter()
        deadline = float("inf") if deadline_s is None else deadline_s
        with anyio.move_on_after(deadline) as scope:
            if control is not None:
                control._scope = scope
                if control.terminated:
                    scope.cancel()
            while arrived < len(keys):
                batch = keys[arrived : arrived + self.batch_pages]
                part = slots[arrived * size : (arrived + len(batch)) * size]
                got = leading(await self.storage.batch_get_v1(batch, part))
                arrived += got
                if got < len(batch):
                    break
        pool = self.host.pool
        self.counters.transitions[Transition.PREFETCH].add(
            arrived, arrived * pool.bytes_per_page, time.perf_counter() - start
        )
        if control is not None:
            control._scope = None
        terminated = control is not None and control.terminated
        return arrived, scope.cancelled_caught and not terminated

    def _commit(
        self,
        key: RadixKey,
        matched: int,
        parent_hash: str | None,
        keys: list[str],
        slots: torch.Tensor,
        arrived: int,
    ) -> None:
        size = self.tree.page_size
        end = matched + arrived * size
        if arrived:
            full = torch.cat([torch.zeros(matched, dtype=torch.int64), slots[: arrived * size]])
            present = self.tree.insert_host(
                RadixKey(key.data[: end * TOKEN_BYTES], key.extra_key), full
            )
        else:
            present = matched
        # Pages another request inserted meanwhile, and pages that did not arrive, go back.
        dup = max(0, min(present, end) - matched)
        self.host.free(torch.cat([slots[:dup], slots[arrived * size :]]))
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
