"""The request-level API: one session per request, from match to commit.

```python
async with cache.session(tokens, extra_key=tenant) as s:   # match; lock the matched prefix
    await s.prefetch()                # L3 -> L2 per the prefetch policy
    hit = await s.load()              # L2 -> L1; hit.length, hit.device_indices
    new = await s.allocate(len(tokens) - hit.length)  # waits (FIFO) while L1 is full
    model.forward(tokens, hit.device_indices, new)
    await s.commit(new)               # insert; the backup is scheduled per the write policy
```

``commit()`` may be called once per chunk (chunked prefill) and ``extend()`` appends decoded
tokens to allocate and commit like the prompt's. Leaving the block unlocks what the session
locked and frees what it allocated but did not commit; cancelling the request at any await
rolls back the transition in flight.
"""

from __future__ import annotations

import enum
import numbers
import zlib
from collections.abc import Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, NamedTuple, Self

import anyio
import torch

from hicache_async._state import OPEN as _OPEN
from hicache_async.config import PrefetchPolicy
from hicache_async.errors import CapacityError, HiCacheError, IndexStateError, LayoutError
from hicache_async.memory.slots import pages_to_slots, slots_to_pages
from hicache_async.metrics import Tier
from hicache_async.radix import TOKEN_BYTES, MatchResult, RadixInputError, RadixKey, TreeNode
from hicache_async.radix import Tier as RadixTier
from hicache_async.radix.key import TokenIds, checked_token_bytes
from hicache_async.tiers.consensus import AgreementError, round_tag
from hicache_async.tiers.load import HostPart
from hicache_async.tiers.prefetch import PrefetchControl, PrefetchOutcome, PrefetchResult
from hicache_async.tiers.room import Turn

if TYPE_CHECKING:
    from hicache_async.cache import HiCache

__all__ = ["Hit", "Session", "SessionState"]

_DEVICE, _HOST, _STORAGE = Tier.DEVICE, Tier.HOST, Tier.STORAGE
_NO_PAGES = torch.empty(0, dtype=torch.int64)
_LOAD_ROUND = 3  # the step bits of a load's agreement round (a prefetch uses 1 and 2)
_new_hit = tuple.__new__  # Hit(...) runs a Python __new__; the hit path builds one per request


class SessionState(enum.Enum):
    """Where a session is in its life."""

    NEW = "new"  # created, not entered
    MATCHED = "matched"  # entered: the matched prefix is locked
    COMMITTED = "committed"  # its KV is in the tree
    CLOSED = "closed"  # left: locks released, uncommitted slots freed


# Module constants: an enum member looked up on its class costs as much as a dict update.
_NEW, _MATCHED = SessionState.NEW, SessionState.MATCHED
_COMMITTED, _CLOSED = SessionState.COMMITTED, SessionState.CLOSED


class Hit(NamedTuple):
    """The cached prefix a request can skip computing (immutable; a named tuple because one
    is built per request, at a third of a frozen dataclass's cost)."""

    length: int  # tokens
    device_indices: torch.Tensor  # int64 token slots in ``cache.device_pool``, one per token
    tokens_by_tier: Mapping[Tier, int] = MappingProxyType({})  # where they came from


class Session:
    """One request's view of the cache. Create with :meth:`HiCache.session`.

    The hit path (enter, ``load`` of a prefix L1 holds, ``allocate``, ``commit``, exit) runs
    without suspending and without tensor work beyond what the tree and the allocator need:
    a session costs little more than matching, locking and unlocking by hand
    (``benchmarks/bench_runtime.py``).
    """

    __slots__ = (
        "_cache",
        "_cached",
        "_device_node",
        "_done",
        "_handed",
        "_handed_start",
        "_hit",
        "_hit_pages",
        "_host_node",
        "_indices_memo",
        "_load_round",
        "_match",
        "_ordinal",
        "_own",
        "_own_slots_all",
        "_prefetch",
        "_slot_end",
        "_storage_tokens",
        "_table",
        "_tag",
        "_turn",
        "key",
        "priority",
        "state",
    )

    def __init__(self, cache: HiCache, key: RadixKey, priority: int = 0) -> None:
        self._cache = cache
        cache._sessions_created += 1
        self._ordinal = cache._sessions_created  # the same on every TP rank, in lockstep
        self.key = key
        self.priority = priority
        self.state = _NEW
        self._match: MatchResult | None = None
        self._device_node: TreeNode | None = None  # device-locked by this session
        self._host_node: TreeNode | None = None  # host-locked by this session (a host hit)
        # The request's page table: ``_table`` holds the tree's pages of its first
        # ``_cached`` tokens (locked through ``_device_node``), ``_own`` the pages it
        # allocated after them (private: a partial page, or pages not committed yet). Of its
        # tokens, ``_done`` have KV in place (hit + committed) and ``_slot_end`` have slots.
        # Before load() gives the hit they count from 0 and move past it then (_begin).
        self._table: torch.Tensor | None = None
        self._own: torch.Tensor | None = None
        # The token slots of ``_own``, kept while it does not change: a decode step hands out
        # a slice of them instead of converting the pages again (a third of a step's cost).
        self._own_slots_all: torch.Tensor | None = None
        # device_indices' slots, with the (_table, _own) they were built from.
        self._indices_memo: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None
        self._cached = self._done = self._slot_end = 0
        self._handed: torch.Tensor | None = None  # the slots the last allocate() returned
        self._handed_start = 0  # and the token they start at
        self._turn: Turn | None = None  # its place among requests waiting for room
        self._prefetch: _BackgroundPrefetch | None = None
        self._storage_tokens = 0
        self._hit: Hit | None = None
        self._hit_pages: torch.Tensor | None = None  # the hit's page table, when L1 held it all
        self._load_round = False  # tensor parallelism: this session's load round was made
        self._tag: int | None = None  # its rounds' tag, once asked for

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self.enter()

    def enter(self) -> Self:
        """Match the key and lock the matched prefix: what ``async with`` does on entry, for
        a scheduler's own loop (the scheduler-level API; pair it with :meth:`finish` or
        :meth:`abort`)."""
        cache = self._cache
        if cache.state is not _OPEN:
            cache._check_open()
        if self.state is not _NEW:
            raise HiCacheError(f"a session is entered once; this one is {self.state.value}")
        tree = cache.tree
        self._match = match = tree.match_prefix(self.key)
        if cache._backs_up_on_hit:
            cache._after_match(match)
        last_device, last_host = match.last_device_node, match.last_host_node
        tree.lock(last_device)
        self._device_node = last_device
        if last_host is not last_device:  # see _rematch
            tree.lock_host(last_host)
            self._host_node = last_host
        cache.counters.requests += 1
        cache._sessions_open += 1
        self.state = _MATCHED
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def finish(self) -> None:
        """End the request (the scheduler-level API's ``async with`` exit): what it committed
        stays in the tree, the private tail and uncommitted slots are freed, locks released."""
        self.close()

    def abort(self) -> None:
        """End the request without finishing it: the same release as :meth:`finish` (every
        commit is whole, so nothing is half-inserted)."""
        self.close()

    def close(self) -> None:
        """Release everything the session holds (idempotent; sync, so it cannot be cut)."""
        if self.state is _CLOSED:
            return
        cache = self._cache
        if self.state is not _NEW:
            cache._sessions_open -= 1
        if self._prefetch is not None:
            self._prefetch.control.terminate()
        if self._turn is not None:
            cache.room.abandon(self._turn)
        self._unlock()
        if self._own is not None:  # the partial last page, slots never committed
            cache.device_tier.free_pages(self._own)
            self._own = self._own_slots_all = None
        self.state = _CLOSED
        if cache.room.waiting:  # one request fewer: the head may see no room can ever come
            cache.room.notify()

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
        self._expect(_MATCHED)
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
        result = await cache.prefetcher.fetch(
            self.key, self.match, deadline_s=deadline, tag=self._round_tag()
        )
        self._still_matched("prefetch()")  # the arrived pages stay in the tree, unlocked
        self._after_prefetch(result)
        return result

    async def load(self, limit: int | None = None) -> Hit:
        """Load the host part of the match onto the device; the hit the request can use.

        ``limit`` caps the hit (rounded down to whole pages): a model that must compute at
        least the prompt's last token to get its logits passes ``len(tokens) - 1``.

        A prefix L1 already holds completes without suspending (no copy to wait for). With
        tensor parallelism every rank uses the same hit, the shortest any rank has (one tagged
        agreement round; a round the ranks reached from different sessions gives no hit).
        """
        hit = self._hit
        if self._cache.state is not _OPEN:
            self._cache._check_open()  # ClosedError: the cache's pages are gone
        if limit is not None:
            _check_count("load(limit=...)", limit)
        if self.state is _MATCHED:
            if hit is not None:
                return hit
        elif self.state is _COMMITTED and hit is not None:
            return hit
        else:  # closed: its pages may be gone, so its hit is no longer there to use
            self._expect(_MATCHED)
        match = self._match
        assert match is not None  # MATCHED
        cache = self._cache
        if (
            self._prefetch is None
            and not match.host_hit_length
            and limit is None
            and cache.consensus is None
        ):
            # The hit path: L1 holds the whole hit, nothing to wait for or to count by tier.
            size = cache.page_size
            pages = self._hit_pages = match.device_pages
            length = pages.numel() * size
            room = -(-(len(self.key.data) // TOKEN_BYTES - length) // size)
            if room > cache._device_allocator.available and _can_fit(cache, room, length):
                await cache.ensure_device_room(room)
                self._still_matched("load()")
            counters = cache.counters
            counters.hit_tokens[_DEVICE] += length
            counters.hit_pages[_DEVICE] += length // size
            self._hit = hit = _new_hit(
                Hit, (length, pages_to_slots(pages, size), {_DEVICE: length, _HOST: 0, _STORAGE: 0})
            )
            return hit
        return await self._load(match, limit)

    async def _load_here(self, match: MatchResult) -> tuple[MatchResult, torch.Tensor, int, int]:
        """This rank's part of :meth:`_load`: collect the prefetch, load the host part. Returns
        the match, the hit's token slots, and the tokens L1 held and loaded."""
        if self._prefetch is not None:
            self._prefetch.control.terminate()
            await self._prefetch.done.wait()
            self._still_matched("load()")
            if self._prefetch.error is not None:
                raise self._prefetch.error
            if self._prefetch.result is not None:
                self._after_prefetch(self._prefetch.result)
            match = self.match  # the arrived pages were matched again
        cache = self._cache
        loader = cache.loader
        if loader is not None and match.host_hit_length:
            match = await self._loadable(match)
        indices = match.device_indices
        device_tokens = indices.numel()
        loaded_tokens = 0
        if match.host_hit_length and loader is not None:
            loaded = None
            with cache.health.contain("load"):  # a failed copy (rolled back) is a miss
                loaded = await loader.load(match)
            # Closed meanwhile (a disconnect): the loaded pages stay in the tree, unlocked.
            self._still_matched("load()")
            loaded_tokens = loaded.loaded_tokens if loaded is not None else 0
            if loaded is not None and loaded_tokens:
                # The loaded nodes are now device-resident: hold them for the model.
                cache.tree.lock(loaded.last_node)
                self._release_device_lock()
                self._device_node = loaded.last_node
                indices = loaded.device_indices
        return match, indices, device_tokens, loaded_tokens

    async def _load(self, match: MatchResult, limit: int | None) -> Hit:
        """:meth:`load` of a hit that has a host part, a prefetch or a limit (or ranks)."""
        cache = self._cache
        try:
            match, indices, device_tokens, loaded_tokens = await self._load_here(match)
        except BaseException:
            if cache.consensus is not None:  # the other ranks still make this session's round
                await self._agreed_hit(0)
            raise
        length = device_tokens + loaded_tokens
        if cache.consensus is not None:  # every rank uses the shortest hit any rank has
            cap = await self._agreed_hit(length)
            limit = cap if limit is None else min(limit, cap)
        if limit is not None and limit < length:
            length = max(0, limit) // cache.page_size * cache.page_size
            indices = indices[:length]
        # Make sure allocate() can place the rest of the prompt: pages pinned by backups in
        # flight free up when their copies land, which only an await can wait for.
        room = -(-(len(self.key.data) // TOKEN_BYTES - length) // cache.page_size)
        if room and room > cache._device_allocator.available and _can_fit(cache, room, length):
            await cache.ensure_device_room(room)
            self._still_matched("load()")
        # Tokens by the tier they were found in: the device part, then pages L2 held, then
        # the pages the prefetch brought from L3 (the match's tail).
        counters = cache.counters
        if device_tokens >= length:  # L1 held it all
            pages = match.device_pages
            cut = length // cache.page_size
            self._hit_pages = pages if cut == pages.numel() else pages[:cut]
            by_tier = {_DEVICE: length, _HOST: 0, _STORAGE: 0}
            counters.hit_tokens[_DEVICE] += length
            counters.hit_pages[_DEVICE] += length // cache.page_size
        else:
            from_host = loaded_tokens - min(self._storage_tokens, loaded_tokens)
            used_host = min(from_host, length - device_tokens)
            by_tier = {
                _DEVICE: device_tokens,
                _HOST: used_host,
                _STORAGE: length - device_tokens - used_host,
            }
            counters.add_hits(by_tier, cache.page_size)
        self._hit = hit = Hit(length, indices, by_tier)
        return hit

    # -- growing the request: allocate, commit, extend -----------------------------------

    @property
    def device_indices(self) -> torch.Tensor:
        """The L1 token slots of every token whose KV is in place: the hit, then what was
        committed (SGLang's ``prefix_indices``), on the L1 pool's device. After a commit
        they may differ from the slots handed out: where another request inserted the same
        pages first, the tree's pages replaced this session's (which were freed)."""
        if self.state is _CLOSED:
            raise HiCacheError("the session ended: its slots may hold other requests' KV now")
        self._begin()
        table, own = self._table, self._own
        assert table is not None
        memo = self._indices_memo
        if memo is None or memo[0] is not table or memo[1] is not own:
            # Built again only when the page table changed (a new page, a commit's insert):
            # a decode step reads a view of the same slots, not an O(length) rebuild.
            pages = table if own is None else torch.cat([table, own])
            cache = self._cache
            slots = pages_to_slots(pages, cache.page_size)
            if cache._slots_move:
                slots = slots.to(cache.device_pool.device)
            memo = self._indices_memo = (table, own, slots)
        return memo[2][: self._done]

    def extend(self, token_ids: TokenIds) -> None:
        """Append tokens (the generated ones, during decode) to the request's key; they are
        then allocated and committed like the prompt's."""
        state = self.state
        if (state is not _MATCHED and state is not _COMMITTED) or self._cache.state is not _OPEN:
            self._expect_active()
        data = checked_token_bytes(token_ids)
        if data:
            key = RadixKey.__new__(RadixKey)  # checked already: no second conversion
            key.data = bytes(self.key.data) + data
            key.extra_key = self.key.extra_key
            self.key = key

    def allocate_nowait(self, n_tokens: int) -> torch.Tensor:
        """Device token slots for the next ``n_tokens`` tokens, on the L1 pool's device, now
        or :class:`CapacityError` (evicting first). The session's last page is filled before
        a new one is taken. Unlike :meth:`allocate` it does not queue behind waiting
        requests: for the steps of requests already running, which must not wait behind new
        ones (their pages are what the new ones wait for)."""
        slots = self.try_allocate(n_tokens)
        if slots is None:
            need = self._pages_for(n_tokens)
            raise CapacityError(_room_report(self._cache, need))
        return slots

    # ``timeout`` bounds the wait for room alone (a CapacityError with the room report, not
    # the caller's cancellation): what anyio's fail_after around the call cannot say.
    async def allocate(
        self,
        n_tokens: int,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> torch.Tensor:
        """:meth:`allocate_nowait`, waiting (first come, first served) while L1 has no room:
        until requests end, evictions become possible or backups land. After ``timeout``
        seconds, or at once when no room can ever come (every open request waits for room
        and no background work will free any), a :class:`CapacityError` saying how much was
        asked, free, evictable and locked."""
        if timeout is not None:
            _check_timeout(timeout)
        need = self._pages_for(n_tokens)
        if need:
            self._check_fits(need)
        cache = self._cache
        room = cache.room
        # Nobody ahead, or no new page (the last page has room: never queue for nothing).
        if need == 0 or not room.waiting:
            pages = self._reserve(need)
            if pages is not None:
                return self._hand(n_tokens, pages)

        async def take() -> torch.Tensor | None:
            await cache.ensure_device_room(need)
            return cache.device_tier.reserve_pages(need)

        self._turn = turn = Turn()
        got: torch.Tensor | None = None
        try:
            with anyio.move_on_after(timeout):
                got = await room.wait(turn, take, lambda: _no_room_ever(cache, need))
        finally:
            self._turn = None
        if got is None:
            raise CapacityError(f"waited {timeout} s: " + _room_report(cache, need))
        if self.state is _CLOSED:  # closed as it got the pages: give them back
            cache.device_tier.free_pages(got)
            self._still_matched("allocate()")
        return self._hand(n_tokens, got)

    async def commit(self, new_slots: torch.Tensor) -> int:
        """Insert the KV of the next ``len(new_slots)`` tokens (after what is cached or
        committed so far); call it once per chunk of a chunked prefill, once per decode step,
        or once for the whole prompt. Every whole page written so far goes into the tree at
        once (a request that starts afterwards hits it) and stays locked for this session; a
        partial last page stays private until it is full or the session ends. Returns how
        many of the tokens another request cached first: their pages are freed and
        :attr:`device_indices` uses the tree's."""
        self._check_slots(new_slots)
        if self._hit is None:
            await self.load()
            self._still_matched("commit()")  # closed while it loaded: its slots are freed
        return self._commit(new_slots)

    def commit_nowait(self, new_slots: torch.Tensor) -> int:
        """:meth:`commit` for a scheduler's own (synchronous) step, once ``load()`` gave the
        hit: it never suspends (SGLang's ``cache_unfinished_req`` per chunk)."""
        self._check_slots(new_slots)
        if self._hit is None:
            raise HiCacheError("commit_nowait() needs the hit: await load() first")
        return self._commit(new_slots)

    def try_allocate(self, n_tokens: int) -> torch.Tensor | None:
        """:meth:`allocate_nowait`, or None when L1 has no room now (a scheduler leaves the
        request waiting for its next step)."""
        need = self._pages_for(n_tokens)
        if need:
            self._check_fits(need)
        pages = self._reserve(need)
        if pages is None:
            self._cache.queue_victim_backups(need)  # write_back: room for a later step
            return None
        return self._hand(n_tokens, pages)

    def _check_fits(self, need: int) -> None:
        """Refuse, before evicting anything, ``need`` more pages than L1 can ever give this
        request beside the pages it holds already (callers skip it when ``need`` is 0: most
        decode steps)."""
        cache = self._cache
        size = cache.page_size
        if self._table is not None:
            cached = self._cached
        else:
            cached = self._match.device_hit_length if self._match is not None else 0
        held = cached // size + (0 if self._own is None else self._own.numel())
        if need + held > cache.l1.allocator.usable:
            raise CapacityError(
                f"a request holding {held} L1 pages can never get {need} more: L1 has "
                f"{cache.l1.allocator.usable} (shorter chunks, or more device_pages)"
            )

    def _check_slots(self, new_slots: object) -> None:
        state = self.state
        if (state is not _MATCHED and state is not _COMMITTED) or self._cache.state is not _OPEN:
            self._expect_active()
        if new_slots is self._handed:  # what allocate() returned (each decode step's case)
            return
        if not isinstance(new_slots, torch.Tensor) or new_slots.device.type == "meta":
            raise LayoutError(
                f"commit() takes the token slots allocate() returned (a tensor), not "
                f"{_describe(new_slots)}"
            )

    def _commit(self, new_slots: torch.Tensor) -> int:
        if self._table is None:
            self._begin()
        start, n = self._done, new_slots.numel()
        if new_slots is not self._handed or self._handed_start != start:
            self._check_next(new_slots, start)
        self._done = done = start + n
        self.state = _COMMITTED
        # A decode step that does not fill its page inserts nothing: no call for it.
        if done - self._cached < self._cache.page_size:
            return 0
        return self._insert_whole_pages()

    # -- helpers --------------------------------------------------------------------------

    def _begin(self) -> None:
        """Start the page table at the hit (once ``load()`` gave it): the positions of
        slots allocated before the load move to just after the hit."""
        if self._table is not None:
            return
        hit = self._hit
        if hit is None:
            raise HiCacheError("load() the hit first: the request's tokens continue after it")
        table = self._hit_pages
        if table is None:
            table = slots_to_pages(hit.device_indices.cpu(), self._cache.page_size)
        self._table = table
        self._cached += hit.length
        self._done += hit.length
        self._slot_end += hit.length

    def _pages_for(self, n_tokens: int) -> int:
        """Check an allocation of ``n_tokens`` and count the new pages it takes."""
        state = self.state
        if state is not _MATCHED and state is not _COMMITTED:
            self._expect_active()
        if self._cache.state is not _OPEN:
            self._cache._check_open()
        if self._turn is not None:
            raise HiCacheError(
                "allocate() is waiting for room for this session: one allocation at a time"
            )
        if type(n_tokens) is not int or n_tokens < 0:  # the check's own cost, only when off
            _check_count("allocate()", n_tokens)
        if self._table is None and self._hit is not None:
            self._begin()
        end = self._slot_end + n_tokens
        if end > len(self.key.data) // TOKEN_BYTES:
            raise LayoutError(
                f"allocate({n_tokens}) goes past the request's {len(self.key)} tokens "
                f"({self._slot_end} have slots); extend() the key with new tokens first"
            )
        size = self._cache.page_size
        held = self._cached // size + (0 if self._own is None else self._own.numel())
        return max(0, -(-end // size) - held)

    def _reserve(self, n_pages: int) -> torch.Tensor | None:
        if not n_pages:
            return _NO_PAGES
        return self._cache.device_tier.reserve_pages(n_pages)

    def _hand(self, n_tokens: int, pages: torch.Tensor) -> torch.Tensor:
        """Add ``pages`` to the session's own pages; the slots of the next ``n_tokens``."""
        cache = self._cache
        size = cache.page_size
        start = self._slot_end
        own = self._own
        if own is None and start == self._cached:  # the usual case: fresh pages only
            self._own = pages
            self._own_slots_all = slots = pages_to_slots(pages, size)
            if n_tokens < slots.numel():
                slots = slots[:n_tokens]
        else:
            if pages is not _NO_PAGES and pages.numel():
                self._own = pages if own is None else torch.cat([own, pages])
                self._own_slots_all = None
            slots = self._own_slots(start, n_tokens)
        self._slot_end = start + n_tokens
        if cache._slots_move:  # where the model indexes
            slots = slots.to(cache.device_pool.device)
        self._handed, self._handed_start = slots, start
        return slots

    def _own_slots(self, start: int, n_tokens: int) -> torch.Tensor:
        """The slots of tokens ``[start, start + n_tokens)`` in the session's own pages."""
        own = self._own
        if own is None:
            return _NO_PAGES
        every = self._own_slots_all
        if every is None:
            self._own_slots_all = every = pages_to_slots(own, self._cache.page_size)
        first = start - self._cached
        return every[first : first + n_tokens]

    def _check_next(self, slots: torch.Tensor, start: int) -> None:
        """Refuse slots that are not the next ones this session allocated: the tree would
        own a page another session (or the allocator) also owns, and both would free it."""
        n = slots.numel()
        if slots.dtype != torch.int64 or slots.dim() != 1:
            raise LayoutError(f"slots must be a 1-D int64 tensor, got {slots.dtype} {slots.shape}")
        n_tokens = len(self.key.data) // TOKEN_BYTES
        if start + n > n_tokens:
            raise LayoutError(f"{start + n} slots for a request of {n_tokens} tokens")
        if start + n > self._slot_end or not torch.equal(slots.cpu(), self._own_slots(start, n)):
            raise HiCacheError(
                f"commit() takes the slots this session's allocate() returned for its next "
                f"tokens, in order (from token {start}; {self._slot_end - start} allocated); "
                f"these are not. Use the tree's insert() for slots allocated elsewhere"
            )

    def _insert_whole_pages(self) -> int:
        """Put the whole pages written so far into the tree and move the session's lock to
        their last node; the tokens another request had inserted first (pages freed)."""
        cache = self._cache
        size = cache.page_size
        aligned = self._done // size * size
        cached = self._cached
        if aligned <= cached:
            return 0
        own, table = self._own, self._table
        assert own is not None
        assert table is not None
        k = (aligned - cached) // size
        fresh = own[:k]
        pages = torch.cat([table, fresh]) if table.numel() else fresh
        key = self.key.prefix(aligned) if aligned < len(self.key.data) // TOKEN_BYTES else self.key
        tree = cache.tree
        present = tree.insert_pages(key, pages, self.priority)
        duplicates = 0
        if present <= cached:  # the tree took every new page (a new node, or adopted)
            last = tree.find(key)
            self._table, self._cached = pages, aligned
            self._own = own[k:] if k < own.numel() else None
            every = self._own_slots_all
            if every is not None and self._own is not None:  # still the same pages, shifted
                self._own_slots_all = every[k * size :]
            else:
                self._own_slots_all = None
        else:
            # Another request inserted some first (or a load holds the rest): the tree's
            # pages replace ours where they differ; ours past what L1 holds stay private.
            tree_pages, last = tree.device_path(key)
            held = tree_pages.numel()
            mine = own[: held - cached // size]
            dup = mine[mine != tree_pages[cached // size : held]]
            if dup.numel():
                cache.device_tier.free_pages(dup)
                duplicates = dup.numel() * size
            self._table, self._cached = tree_pages, held * size
            rest = own[held - cached // size :]
            self._own = rest if rest.numel() else None
            self._own_slots_all = None
        old = self._device_node
        tree.lock(last)
        self._device_node = last
        if old is not None:
            tree.unlock(old)
        cache.after_insert(key, aligned - present)
        return duplicates

    async def _loadable(self, match: MatchResult) -> MatchResult:
        """Match again until the host part can be loaded now: a part another request is
        loading is waited for (its pages are on their way); a part that reached L1 since
        the match (another load, a recompute) is matched again at once, never waited on (the
        load that would wake it may never come). Then make L1 room for it: under
        ``write_back`` the victims are backed up first."""
        cache = self._cache
        loader = cache.loader
        assert loader is not None
        waited = room_made = stale = False
        while match.host_hit_length:
            part = loader.host_part(match)
            if part is HostPart.STALE:
                if stale:  # a fresh match's host part holds HOST and LOADING nodes only
                    raise IndexStateError(f"a fresh match's host part is not on host: {match}")
                stale = True
                match = self._rematch()
                continue
            stale = False
            if part is HostPart.IN_FLIGHT:
                if not waited:
                    waited = True
                    loader.count_wait()
                await loader.wait_settled()
                self._still_matched("load()")
                match = self._rematch()
                continue
            pages = match.host_hit_length // cache.page_size
            if room_made or pages <= cache._device_allocator.available:
                return match
            room_made = True  # once: what L1 cannot free then, the load skips
            await cache.ensure_device_room(pages)
            self._still_matched("load()")
        return match

    def _after_prefetch(self, result: PrefetchResult) -> None:
        if result.arrived_pages:
            self._storage_tokens += result.arrived_pages * self._cache.page_size
            self._rematch()  # the arrived pages are host nodes below the match now

    async def _agreed_hit(self, length: int) -> int:
        """Tensor parallelism: the hit every rank uses, the shortest any rank has, from this
        session's one load round (the round is shielded in the consensus; a second
        ``load()`` after a failed one makes none and gets no hit)."""
        consensus = self._cache.consensus
        assert consensus is not None
        if self._load_round:
            return 0
        self._load_round = True
        agreed = await consensus.agree_round(self._round_tag() | _LOAD_ROUND, [length])
        return agreed[0] if agreed is not None else 0

    def _round_tag(self) -> int:
        """This session's tag in tensor-parallel agreement rounds (0 without them); the CRC
        of the key is taken once, on the first round."""
        if self._cache.consensus is None:
            return 0
        if self._tag is None:
            fingerprint = zlib.crc32(self.key.data)
            if self.key.extra_key is not None:
                fingerprint ^= zlib.crc32(self.key.extra_key.encode())
            self._tag = round_tag(fingerprint, self._ordinal, 0)
        return self._tag

    def _matched_tokens(self) -> int:
        return self.match.device_hit_length + self.match.host_hit_length

    def _rematch(self) -> MatchResult:
        """Match the key and lock what matched: the device path, and the host path when part
        of the hit is on host only (a device lock already keeps the host copies of its path:
        L2 evicts host-only nodes alone). Returns the new match."""
        cache = self._cache
        tree = cache.tree
        match = tree.match_prefix(self.key)
        if cache._backs_up_on_hit:
            cache._after_match(match)
        last_device, last_host = match.last_device_node, match.last_host_node
        tree.lock(last_device)
        host_part = last_host is not last_device
        if host_part:
            tree.lock_host(last_host)
        self._unlock()
        self._match = match
        self._device_node = last_device
        self._host_node = last_host if host_part else None
        return match

    def _release_device_lock(self) -> None:
        node = self._device_node
        if node is not None:
            self._device_node = None
            self._cache.tree.unlock(node)

    def _unlock(self) -> None:
        node = self._device_node
        if node is not None:
            self._device_node = None
            self._cache.tree.unlock(node)
        node = self._host_node
        if node is not None:
            self._host_node = None
            self._cache.tree.unlock_host(node)

    def _still_matched(self, step: str) -> None:
        """After an await: refuse to go on when the session was closed meanwhile (its locks
        are released and its allocation freed; nothing may be locked or inserted for it)."""
        if self.state is _CLOSED:
            raise HiCacheError(f"the session was closed while {step} was in flight")

    def _expect_active(self) -> None:
        """Entered and not closed (matched, or committed some), in an open cache."""
        if self.state is not _MATCHED and self.state is not _COMMITTED:
            self._expect(_MATCHED)
        if self._cache.state is not _OPEN:
            self._cache._check_open()

    def _expect(self, state: SessionState) -> None:
        if self.state is not state:
            raise HiCacheError(f"the session is {self.state.value}; this step needs {state.value}")


def _can_fit(cache: HiCache, pages: int, hit_tokens: int) -> bool:
    """Whether L1 could ever hold ``pages`` more beside a hit of ``hit_tokens``: a prompt
    longer than L1 (prefilled in chunks) must not evict the whole cache at load()."""
    return pages + hit_tokens // cache.page_size <= cache.l1.allocator.usable


def _room_report(cache: HiCache, pages: int) -> str:
    """How much an allocation asked for, and where L1's pages are."""
    allocator, tree, size = cache.l1.allocator, cache.tree, cache.page_size
    return (
        f"L1 has no room for {pages} pages: {allocator.available} free, "
        f"{tree.evictable_size(RadixTier.DEVICE) // size} evictable, "
        f"{tree.protected_size(RadixTier.DEVICE) // size} locked by requests in flight, of "
        f"{allocator.usable}; {cache.room.waiting} requests waiting for room. Fewer concurrent "
        f"requests, shorter chunks or more device_pages (or allocate(timeout=...) to wait)"
    )


def _no_room_ever(cache: HiCache, pages: int) -> str | None:
    """Why a wait for room can never end, or None: every open request is waiting for room
    (none will end and free its pages) and no backup or prefetch in flight will unpin any."""
    if cache.room.waiting < cache._sessions_open or cache._backups_pending.count:
        return None
    if cache.write_back is not None and cache.write_back.pending.count:
        return None  # L3 writes landing unpin L2, where L1 victims can then go
    if cache.prefetcher is not None and cache.prefetcher.running.count:
        return None
    return (
        f"every open request ({cache._sessions_open}) is waiting for L1 room, so none can "
        f"free any: " + _room_report(cache, pages)
    )


def check_priority(priority: object) -> None:
    """A request's priority: a real number (an int, as in SGLang; a bool, str or None would be
    stored on the nodes the request inserts and break every comparison after it)."""
    if isinstance(priority, bool) or not isinstance(priority, numbers.Real):
        raise RadixInputError(f"priority must be an int, not {_describe(priority)}")


def _check_timeout(timeout: object) -> None:
    """``allocate(timeout=)``: None (wait as long as it takes) or seconds, a real number."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or timeout != timeout:
        raise LayoutError(f"allocate() takes timeout=None or seconds, not {_describe(timeout)}")


def _check_count(what: str, value: object) -> None:
    """A token count from the caller: a non-negative int (a bool or float is a mistake)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LayoutError(f"{what} takes a token count (int), not {_describe(value)}")
    if value < 0:
        raise LayoutError(f"{what} takes a token count >= 0, not {value}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.device.type} tensor"
    return f"{type(value).__name__} {value!r:.40}"


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
        self.error: AgreementError | None = None  # raised again by the session's load()
        cache = session._cache
        assert cache.prefetcher is not None
        cache.tree.lock(self.match.last_device_node)
        cache.tree.lock_host(self.match.last_host_node)
        cache.prefetcher.running.add()  # from now: a drain() waits for it, started or not

    async def run(self) -> None:
        cache = self.session._cache
        assert cache.prefetcher is not None
        try:
            with cache.health.contain("prefetch"):  # a miss for this request, not the end
                self.result = await cache.prefetcher.fetch(
                    self.session.key,
                    self.match,
                    control=self.control,
                    tag=self.session._round_tag(),
                )
        except AgreementError as exc:  # the ranks fell out of step: the request must know
            self.error = exc
        finally:
            cache.tree.unlock_host(self.match.last_host_node)
            cache.tree.unlock(self.match.last_device_node)
            cache.prefetcher.running.done()
            self.done.set()
