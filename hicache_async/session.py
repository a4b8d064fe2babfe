"""The request-level API: one session per request, from match to commit.

```python
async with cache.session(tokens, extra_key=tenant) as s:   # match; lock the matched prefix
    await s.prefetch()                # L3 -> L2 per the prefetch policy
    hit = await s.load()              # L2 -> L1; hit.length, hit.device_indices
    new = s.allocate(len(tokens) - hit.length)
    model.forward(tokens, hit.device_indices, new)
    await s.commit(new)               # insert; the backup is scheduled per the write policy
```

Leaving the block unlocks what the session locked and frees what it allocated but did not
commit; cancelling the request at any await rolls back the transition in flight.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Self

import anyio
import torch

from hicache_async.config import PrefetchPolicy
from hicache_async.errors import CapacityError, HiCacheError, LayoutError
from hicache_async.metrics import Tier
from hicache_async.radix import MatchResult, RadixKey, TreeNode
from hicache_async.tiers.load import LoadResult
from hicache_async.tiers.prefetch import PrefetchControl, PrefetchOutcome, PrefetchResult

if TYPE_CHECKING:
    from hicache_async.cache import HiCache

__all__ = ["Hit", "Session", "SessionState"]


class SessionState(enum.Enum):
    """Where a session is in its life."""

    NEW = "new"  # created, not entered
    MATCHED = "matched"  # entered: the matched prefix is locked
    COMMITTED = "committed"  # its KV is in the tree
    CLOSED = "closed"  # left: locks released, uncommitted slots freed


@dataclass(frozen=True, slots=True)
class Hit:
    """The cached prefix a request can skip computing."""

    length: int  # tokens
    device_indices: torch.Tensor  # int64 token slots in ``cache.device_pool``, one per token
    tokens_by_tier: dict[Tier, int] = field(default_factory=dict)  # where they came from


class Session:
    """One request's view of the cache. Create with :meth:`HiCache.session`."""

    def __init__(self, cache: HiCache, key: RadixKey, priority: int = 0) -> None:
        self._cache = cache
        self.key = key
        self.priority = priority
        self.state = SessionState.NEW
        self._match: MatchResult | None = None
        self._device_node: TreeNode | None = None  # device-locked by this session
        self._host_node: TreeNode | None = None  # host-locked by this session
        self._allocated: torch.Tensor | None = None  # device slots not yet committed
        self._prefetch: _BackgroundPrefetch | None = None
        self._storage_tokens = 0
        self._hit: Hit | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._cache._check_open()
        self._rematch()
        self._cache.counters.requests += 1
        self.state = SessionState.MATCHED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release everything the session holds (idempotent; sync, so it cannot be cut)."""
        if self.state is SessionState.CLOSED:
            return
        if self._prefetch is not None:
            self._prefetch.control.terminate()
        self._unlock()
        if self._allocated is not None:
            self._cache.device_tier.free(self._allocated)
            self._allocated = None
        self.state = SessionState.CLOSED

    # -- the steps ------------------------------------------------------------------------

    @property
    def match(self) -> MatchResult:
        """The current match (device part, then host part)."""
        assert self._match is not None, "enter the session first"
        return self._match

    async def prefetch(self) -> PrefetchResult:
        """Bring what L1 and L2 miss from L3, per the cache's prefetch policy.

        ``best_effort`` starts it in the background and returns at once (``load`` takes what
        arrived); ``wait_complete`` waits for every page; ``timeout`` waits up to the linear
        deadline and keeps what arrived.
        """
        self._expect(SessionState.MATCHED)
        cache = self._cache
        if cache.prefetcher is None or self._prefetch is not None:
            return PrefetchResult(PrefetchOutcome.SKIPPED)
        policy = cache.config.prefetch_policy
        if policy is PrefetchPolicy.BEST_EFFORT:
            self._prefetch = _BackgroundPrefetch(self)
            cache._task_group.start_soon(self._prefetch.run)
            return PrefetchResult(PrefetchOutcome.STARTED)  # load() takes what arrived
        deadline = None
        if policy is PrefetchPolicy.TIMEOUT:
            deadline = cache.config.prefetch_timeout(len(self.key) - self._matched_tokens())
        result = await cache.prefetcher.fetch(self.key, self.match, deadline_s=deadline)
        self._after_prefetch(result)
        return result

    async def load(self, limit: int | None = None) -> Hit:
        """Load the host part of the match onto the device; the hit the request can use.

        ``limit`` caps the hit (rounded down to whole pages): a model that must compute at
        least the prompt's last token to get its logits passes ``len(tokens) - 1``.
        """
        self._expect(SessionState.MATCHED)
        if self._hit is not None:
            return self._hit
        if self._prefetch is not None:
            self._prefetch.control.terminate()
            await self._prefetch.done.wait()
            if self._prefetch.result is not None:
                self._after_prefetch(self._prefetch.result)
        cache = self._cache
        match = self.match
        device_tokens = match.device_hit_length
        if cache.loader is None:  # no L2: nothing to load
            loaded = LoadResult(match.device_indices, 0, match.last_device_node)
        else:
            loaded = await cache.loader.load(match)
        if loaded.loaded_tokens:
            # The loaded nodes are now device-resident: hold them for the model.
            cache.tree.lock(loaded.last_node)
            self._release_device_lock()
            self._device_node = loaded.last_node
        length = device_tokens + loaded.loaded_tokens
        if limit is not None and limit < length:
            length = max(0, limit) // cache.page_size * cache.page_size
        # Tokens by the tier they were found in: the device part, then pages L2 held, then
        # the pages the prefetch brought from L3 (the match's tail).
        used_device = min(device_tokens, length)
        from_host = loaded.loaded_tokens - min(self._storage_tokens, loaded.loaded_tokens)
        used_host = min(from_host, length - used_device)
        by_tier = {
            Tier.DEVICE: used_device,
            Tier.HOST: used_host,
            Tier.STORAGE: length - used_device - used_host,
        }
        # Make sure allocate() can place the rest of the prompt: pages pinned by backups in
        # flight free up when their copies land, which only an await can wait for.
        await cache.ensure_device_room(-(-(len(self.key) - length) // cache.page_size))
        for tier, tokens in by_tier.items():
            cache.counters.hit_tokens[tier] += tokens
            cache.counters.hit_pages[tier] += tokens // cache.page_size
        self._hit = Hit(length, loaded.device_indices[:length], by_tier)
        return self._hit

    def allocate(self, n_tokens: int) -> torch.Tensor:
        """Device token slots for ``n_tokens`` new tokens (whole pages are reserved), on the
        L1 pool's device."""
        self._expect(SessionState.MATCHED)
        if n_tokens < 0:
            raise LayoutError(f"cannot allocate {n_tokens} tokens")
        size = self._cache.page_size
        pages = -(-n_tokens // size)
        slots = self._cache.device_tier.reserve(pages)
        if slots is None:
            raise CapacityError(
                f"L1 has no room for {pages} pages even after eviction; fewer concurrent "
                f"requests or more device_pages"
            )
        self._allocated = slots if self._allocated is None else torch.cat([self._allocated, slots])
        return slots[:n_tokens].to(self._cache.device_pool.device)  # where the model indexes

    async def commit(self, new_slots: torch.Tensor) -> int:
        """Insert the prompt's KV (the hit, then ``new_slots``) into the tree; returns how many
        tokens were cached by another request meanwhile (their duplicate slots are freed)."""
        self._expect(SessionState.MATCHED)
        hit = self._hit or await self.load()
        cache = self._cache
        size = cache.page_size
        slots = torch.cat([hit.device_indices, new_slots.to(hit.device_indices.device)])
        if slots.numel() > len(self.key):
            raise LayoutError(f"{slots.numel()} slots for a prompt of {len(self.key)} tokens")
        aligned = slots.numel() // size * size
        duplicates = 0
        if aligned > hit.length:
            key = self.key.prefix(aligned)  # a view: no copy of the prompt
            present = cache.tree.insert(key, slots[:aligned], self.priority)
            self._give_to_tree(new_slots, hit.length, present, aligned)
            duplicates = max(0, min(present, aligned) - hit.length)
            cache.after_insert(key, aligned - present)
        self.state = SessionState.COMMITTED
        return duplicates

    # -- helpers --------------------------------------------------------------------------

    def _give_to_tree(self, new: torch.Tensor, start: int, present: int, end: int) -> None:
        """The tree now owns ``new``'s whole pages in ``[max(start, present), end)``; slots
        another request cached first (``[start, present)``) and the partial tail stay ours to
        free on exit."""
        allocated = self._allocated
        if allocated is None:
            return
        owned = new[max(0, present - start) : max(0, end - start)]
        if owned.numel():
            # A few pages: a set is far cheaper than torch.isin on small tensors.
            size = self._cache.page_size
            taken = set(owned[::size].tolist())
            pages = allocated[::size].tolist()
            kept = [i for i, first in enumerate(pages) if first not in taken]
            if not kept:  # the usual case: the tree took every page
                self._allocated = None
                return
            if len(kept) == len(pages):
                return
            index = torch.tensor(kept, dtype=torch.int64)
            self._allocated = allocated.view(-1, size)[index].reshape(-1)

    def _after_prefetch(self, result: PrefetchResult) -> None:
        if result.arrived_pages:
            self._storage_tokens += result.arrived_pages * self._cache.page_size
            self._rematch()  # the arrived pages are host nodes below the match now

    def _matched_tokens(self) -> int:
        return self.match.device_hit_length + self.match.host_hit_length

    def _rematch(self) -> None:
        tree = self._cache.tree
        match = tree.match_prefix(self.key)
        self._cache._after_match(match)
        tree.lock(match.last_device_node)
        tree.lock_host(match.last_host_node)
        self._unlock()
        self._match = match
        self._device_node, self._host_node = match.last_device_node, match.last_host_node

    def _release_device_lock(self) -> None:
        if self._device_node is not None:
            self._cache.tree.unlock(self._device_node)
            self._device_node = None

    def _unlock(self) -> None:
        self._release_device_lock()
        if self._host_node is not None:
            self._cache.tree.unlock_host(self._host_node)
            self._host_node = None

    def _expect(self, state: SessionState) -> None:
        if self.state is not state:
            raise HiCacheError(f"the session is {self.state.value}; this step needs {state.value}")


class _BackgroundPrefetch:
    """A ``best_effort`` prefetch running in the cache's task group for one session.

    It pins the session's matched path from the moment it is created (sync), so the path is
    still in the tree when the task starts, even if the session has ended by then.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.match = session.match
        self.control = PrefetchControl()
        self.done = anyio.Event()
        self.result: PrefetchResult | None = None
        tree = session._cache.tree
        tree.lock(self.match.last_device_node)
        tree.lock_host(self.match.last_host_node)

    async def run(self) -> None:
        cache = self.session._cache
        assert cache.prefetcher is not None
        try:
            self.result = await cache.prefetcher.fetch(
                self.session.key, self.match, control=self.control
            )
        finally:
            cache.tree.unlock_host(self.match.last_host_node)
            cache.tree.unlock(self.match.last_device_node)
            self.done.set()
