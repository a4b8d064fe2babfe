"""Hypothesis state machine: the radix tree against a dict of cached page prefixes.

The model keeps, per tier, ``{(extra_key, tokens up to the end of page i): slots of page i}``;
matching is "the leading pages whose prefixes are on device, then those on host". Every eviction
is checked page by page against the model (only unlocked leaves, exactly the slots of the pages
it took, nothing left to evict when it stops short), and ``tree.check()`` runs after every step.
"""

from __future__ import annotations

import random
from collections import Counter

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hicache_async.radix import RadixKey, RadixTree, TreeNode

Page = tuple[str | None, tuple[int, ...]]

# Mostly small ids (shared prefixes); 2**32 has the low 32 bits of 0 and -1 is negative: both
# are kept as int64 by the tree, next to int32 nodes (a narrowing bug would match them with 0).
tokens_st = st.lists(st.sampled_from([0, 1, 2, 0, 1, 2, 2**32, -1]), min_size=0, max_size=12)
extra_st = st.sampled_from([None, None, "x"])


class RadixMachine(RuleBasedStateMachine):
    @initialize(
        page=st.sampled_from([1, 2, 3]),
        policy=st.sampled_from(["lru", "lfu", "fifo", "mru", "filo", "priority"]),
        narrow_min=st.sampled_from([0, 3, 512]),  # int32 ids for all, longer, no new spans
    )
    def setup(self, page: int, policy: str, narrow_min: int) -> None:
        self.P = page
        self.tree = RadixTree(page_size=page, eviction_policy=policy)
        self.tree.narrow_min_tokens = narrow_min
        self.dev: dict[Page, tuple[int, ...]] = {}
        self.host: dict[Page, tuple[int, ...]] = {}
        self.dev_locks: list[tuple[TreeNode, list[Page]]] = []
        self.host_locks: list[tuple[TreeNode, list[Page]]] = []
        self.next_dev = 0
        self.next_host = 6 * 10**5  # a multiple of every page size drawn
        self.last: tuple[RadixKey, object] | None = None

    # ------------------------------------------------------------------ helpers

    def pages(self, toks: list[int], extra: str | None) -> list[Page]:
        n = len(toks) // self.P
        return [(extra, tuple(toks[: (i + 1) * self.P])) for i in range(n)]

    def node_pages(self, node: TreeNode) -> list[Page]:
        key = self.tree.path_key(node)
        pages = self.pages(key.token_ids(), key.extra_key)
        return pages[len(pages) - node.num_tokens // self.P :]

    def path_pages(self, node: TreeNode) -> list[Page]:
        key = self.tree.path_key(node)
        return self.pages(key.token_ids(), key.extra_key)

    def fresh(self, n: int, host: bool = False) -> torch.Tensor:
        """Slots of whole fresh pages, as the paged pools allocate them (the tree keeps pages)."""
        used = -(-n // self.P) * self.P
        if host:
            lo, self.next_host = self.next_host, self.next_host + used
        else:
            lo, self.next_dev = self.next_dev, self.next_dev + used
        return torch.arange(lo, lo + n, dtype=torch.int64)

    def locked(self, locks: list[tuple[TreeNode, list[Page]]]) -> set[Page]:
        return {p for _, ps in locks for p in ps}

    def split_slots(self, slots: torch.Tensor, pages: list[Page]) -> dict[Page, tuple[int, ...]]:
        s = slots.tolist()
        return {p: tuple(s[i * self.P : (i + 1) * self.P]) for i, p in enumerate(pages)}

    @staticmethod
    def below(p: Page, q: Page) -> bool:
        """q is a strict extension of p."""
        return q[0] == p[0] and len(q[1]) > len(p[1]) and q[1][: len(p[1])] == p[1]

    # ------------------------------------------------------------------ rules

    @rule(toks=tokens_st, extra=extra_st)
    def match(self, toks: list[int], extra: str | None) -> None:
        key = RadixKey(toks, extra)
        r = self.tree.match_prefix(key)
        exp_dev: list[int] = []
        host_len = 0
        on_dev = True
        for p in self.pages(toks, extra):
            if on_dev and p in self.dev:
                exp_dev.extend(self.dev[p])
            elif p in self.host:
                on_dev = False
                host_len += self.P
            else:
                break
        assert r.device_indices.tolist() == exp_dev
        assert r.host_hit_length == host_len
        assert (
            self.path_pages(r.last_device_node) == self.pages(toks, extra)[: len(exp_dev) // self.P]
        )
        self.last = (key, r)

    @rule(toks=tokens_st, extra=extra_st, prio=st.integers(0, 2))
    def insert(self, toks: list[int], extra: str | None, prio: int) -> None:
        slots = self.fresh(len(toks))
        got = self.tree.insert(RadixKey(toks, extra), slots, priority=prio)
        pages = self.pages(toks, extra)
        cached = 0
        while cached < len(pages) and pages[cached] in self.dev:
            cached += 1
        assert got == cached * self.P
        self.dev.update(self.split_slots(slots[cached * self.P :], pages[cached:]))

    @rule(toks=tokens_st, extra=extra_st)
    def insert_host(self, toks: list[int], extra: str | None) -> None:
        slots = self.fresh(len(toks), host=True)
        got = self.tree.insert_host(RadixKey(toks, extra), slots)
        pages = self.pages(toks, extra)
        have = 0
        while have < len(pages) and (pages[have] in self.dev or pages[have] in self.host):
            have += 1
        assert got == have * self.P
        self.host.update(self.split_slots(slots[have * self.P :], pages[have:]))

    @precondition(lambda self: self.last is not None)
    @rule(host=st.booleans())
    def lock_last(self, host: bool) -> None:
        _, r = self.last  # type: ignore[misc]
        node = r.last_host_node if host else r.last_device_node  # type: ignore[attr-defined]
        if node.state.name == "REMOVED":
            return
        if host:
            self.tree.lock_host(node)
            self.host_locks.append((node, self.path_pages(node)))
        else:
            self.tree.lock(node)
            self.dev_locks.append((node, self.path_pages(node)))

    @precondition(lambda self: self.dev_locks or self.host_locks)
    @rule(data=st.data())
    def unlock_one(self, data: st.DataObject) -> None:
        locks = self.dev_locks if self.dev_locks else self.host_locks
        if self.dev_locks and self.host_locks:
            locks = data.draw(st.sampled_from([self.dev_locks, self.host_locks]))
        node, _ = locks.pop(data.draw(st.integers(0, len(locks) - 1)))
        (self.tree.unlock if locks is self.dev_locks else self.tree.unlock_host)(node)

    @precondition(lambda self: self.last is not None)
    @rule()
    def backup_and_load_last(self) -> None:
        """Write the matched device path through to host, and load its host part back."""
        key, _r = self.last  # type: ignore[misc]
        fresh = self.tree.match_prefix(key)
        for node in self.tree.path(fresh.last_host_node):
            if node.state.name == "DEVICE":
                slots = self.fresh(node.num_tokens, host=True)
                self.tree.start_backup(node, slots)
                self.tree.finish_backup(node)
                self.host.update(self.split_slots(slots, self.node_pages(node)))
            elif node.state.name == "HOST":
                slots = self.fresh(node.num_tokens)
                self.tree.start_load(node, slots)
                self.tree.finish_load(node)
                self.dev.update(self.split_slots(slots, self.node_pages(node)))

    def dev_candidates(self, keep_host: bool) -> list[Page]:
        dl, hl = self.locked(self.dev_locks), self.locked(self.host_locks)
        out = []
        for p in self.dev:
            if p in dl or any(self.below(p, q) for q in self.dev):
                continue
            if (keep_host and p in self.host) or p not in hl:
                out.append(p)
        return out

    @rule(n=st.integers(0, 6), keep_host=st.booleans())
    def evict(self, n: int, keep_host: bool) -> None:
        dl, hl = self.locked(self.dev_locks), self.locked(self.host_locks)
        ev = self.tree.evict(n, keep_host=keep_host)
        exp_dev: Counter[int] = Counter()
        exp_host: Counter[int] = Counter()
        taken = 0
        for node in ev.demoted:
            for p in self.node_pages(node):
                assert p in self.dev
                assert p in self.host
                assert p not in dl
                assert keep_host
                exp_dev.update(self.dev.pop(p))
                taken += 1
        for node in ev.removed:
            for p in self.node_pages(node):
                assert p not in dl, f"evicted device-locked page {p}"
                assert p not in hl, f"evicted host-locked page {p}"
                if p in self.dev:
                    exp_dev.update(self.dev.pop(p))
                    taken += 1
                if p in self.host:
                    exp_host.update(self.host.pop(p))
        gone = [p for node in (*ev.demoted, *ev.removed) for p in self.node_pages(node)]
        for p in gone:  # what went was a leaf: nothing on device still hangs below it
            assert not any(self.below(p, q) for q in self.dev)
        assert Counter(ev.device_indices.tolist()) == exp_dev
        assert Counter(ev.host_indices.tolist()) == exp_host
        assert ev.num_pages == taken <= n
        if taken < n:
            assert not self.dev_candidates(keep_host)

    @rule(n=st.integers(0, 6))
    def evict_host(self, n: int) -> None:
        dl, hl = self.locked(self.dev_locks), self.locked(self.host_locks)
        ev = self.tree.evict_host(n)
        assert ev.device_indices.numel() == 0
        exp: Counter[int] = Counter()
        for node in ev.removed:
            for p in self.node_pages(node):
                assert p in self.host
                assert p not in self.dev
                assert p not in dl
                assert p not in hl
                exp.update(self.host.pop(p))
        for p in [p for node in ev.removed for p in self.node_pages(node)]:
            assert not any(self.below(p, q) for q in (*self.host, *self.dev))
        assert Counter(ev.host_indices.tolist()) == exp
        assert ev.num_pages == len(exp) // self.P <= n
        if ev.num_pages < n:
            for p in self.host:
                free = p not in self.dev and p not in dl and p not in hl
                leaf = not any(self.below(p, q) for q in (*self.host, *self.dev))
                assert not (free and leaf), f"host page {p} was left evictable"

    @invariant()
    def consistent(self) -> None:
        if hasattr(self, "tree"):
            self.tree.check()
            assert self.tree.total_size() == len(self.dev) * self.P
            assert self.tree.total_size("host") == len(self.host) * self.P  # type: ignore[arg-type]


RadixMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None, derandomize=True
)
TestRadixMachine = RadixMachine.TestCase
random.seed(0)
