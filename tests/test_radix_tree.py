"""Radix tree: split, insert, match, locks, host tier, transitions, eviction and bad input."""

from __future__ import annotations

import pytest
import torch

from hicache_async.errors import IndexStateError
from hicache_async.radix import NodeState, RadixInputError, RadixKey, RadixTree, Tier
from hicache_async.radix.tree import pages_of


def slots(lo: int, n: int) -> torch.Tensor:
    return torch.arange(lo, lo + n, dtype=torch.int64)


def test_insert_match_split_page_aligned() -> None:
    tree = RadixTree(page_size=4)
    assert tree.insert(RadixKey(range(10)), slots(0, 10)) == 0  # 2 whole pages; tail ignored
    assert tree.total_size() == 8
    r = tree.match_prefix(RadixKey(range(12)))
    assert r.device_indices.tolist() == list(range(8))
    assert r.host_hit_length == 0
    # diverge inside the second page: only the first page matches, and the node is split
    r = tree.match_prefix(RadixKey([0, 1, 2, 3, 4, 5, 99, 7]))
    assert r.device_indices.tolist() == [0, 1, 2, 3]
    assert r.last_device_node.num_tokens == 4
    assert tree.root.children[RadixKey(range(4)).data] is r.last_device_node
    tree.check()
    # a shorter query than one page matches nothing
    assert tree.match_prefix(RadixKey([0, 1, 2])).device_hit_length == 0
    tree.check()


def test_duplicate_insert_returns_cached_length() -> None:
    tree = RadixTree(page_size=2)
    assert tree.insert(RadixKey([1, 2, 3, 4]), slots(0, 4)) == 0
    assert tree.insert(RadixKey([1, 2, 3, 4]), slots(10, 4)) == 4
    assert tree.insert(RadixKey([1, 2, 3, 4, 5, 6, 7]), slots(20, 7)) == 4
    assert tree.match_prefix(RadixKey([1, 2, 3, 4, 5, 6])).device_indices.tolist() == [
        0, 1, 2, 3, 24, 25,
    ]  # fmt: skip
    assert tree.insert(RadixKey([1, 2, 9, 9]), slots(30, 4)) == 2
    assert tree.total_size() == 8
    tree.check()


def test_page_size_one() -> None:
    tree = RadixTree(page_size=1)
    tree.insert(RadixKey([1, 2, 3]), slots(0, 3))
    tree.insert(RadixKey([1, 2, 4]), slots(10, 3))
    assert tree.match_prefix(RadixKey([1, 2, 4, 5])).device_indices.tolist() == [0, 1, 12]
    tree.check()


def test_extra_keys_never_share_nodes() -> None:
    tree = RadixTree(page_size=2)
    tree.insert(RadixKey([1, 2, 3, 4]), slots(0, 4))
    assert tree.match_prefix(RadixKey([1, 2, 3, 4], "a")).device_hit_length == 0
    assert tree.insert(RadixKey([1, 2, 3, 4], "a"), slots(10, 4)) == 0
    assert tree.match_prefix(RadixKey([1, 2, 3, 4], "a")).device_indices.tolist() == [
        10,
        11,
        12,
        13,
    ]
    assert tree.match_prefix(RadixKey([1, 2, 3, 4], "b")).device_hit_length == 0
    assert tree.match_prefix(RadixKey([1, 2, 3, 4])).device_indices.tolist() == [0, 1, 2, 3]
    assert tree.total_size() == 8
    tree.check()
    tree.evict(100)
    assert tree.total_size() == 0
    tree.check()


def test_locks_protect_and_counters() -> None:
    tree = RadixTree(page_size=1)
    tree.insert(RadixKey([1, 2, 3]), slots(0, 3))
    tree.insert(RadixKey([1, 2, 5]), slots(10, 3))
    node = tree.match_prefix(RadixKey([1, 2, 3])).last_device_node
    tree.lock(node)
    assert tree.protected_size() == 3
    assert tree.evictable_size() == 1
    tree.check()
    ev = tree.evict(10)
    assert ev.device_indices.tolist() == [12]
    assert tree.total_size() == 3
    assert tree.match_prefix(RadixKey([1, 2, 3])).device_hit_length == 3
    tree.unlock(node)
    assert tree.evictable_size() == 3
    with pytest.raises(IndexStateError, match="below zero"):
        tree.unlock(node)
    tree.check()
    assert sorted(tree.evict(10).device_indices.tolist()) == [0, 1, 2]
    with pytest.raises(IndexStateError, match="removed"):
        tree.lock(node)
    tree.check()


def test_partial_eviction_takes_the_tail() -> None:
    tree = RadixTree(page_size=2)
    tree.insert(RadixKey(range(8)), slots(0, 8))
    ev = tree.evict(1)
    assert ev.device_indices.tolist() == [6, 7]
    assert ev.num_pages == 1
    assert tree.match_prefix(RadixKey(range(8))).device_indices.tolist() == list(range(6))
    tree.check()


def _both(tree: RadixTree, tokens: list[int], lo: int) -> None:
    """Insert on device and back it up to host (a completed write-through)."""
    tree.insert(RadixKey(tokens), slots(lo, len(tokens)))
    for n in tree.path(tree.match_prefix(RadixKey(tokens)).last_device_node):
        if n.state is NodeState.DEVICE:
            tree.start_backup(
                n, slots(1000 + lo + len(tree.path_key(n)) - n.num_tokens, n.num_tokens)
            )
            tree.finish_backup(n)


def test_demotion_to_host_and_host_match() -> None:
    tree = RadixTree(page_size=1)
    _both(tree, [1, 2, 3, 4], 0)
    assert tree.total_size(Tier.HOST) == 4
    tree.check()
    # evict the tail two pages from device, keeping host copies
    node = tree.match_prefix(RadixKey([1, 2, 3, 4])).last_device_node
    ev = tree.evict(2, keep_host=True)
    assert ev.device_indices.tolist() == [2, 3]
    assert [n.state for n in ev.demoted] == [NodeState.HOST]
    assert node.state is NodeState.HOST
    r = tree.match_prefix(RadixKey([1, 2, 3, 4, 5]))
    assert r.device_indices.tolist() == [0, 1]
    assert r.host_hit_length == 2
    assert r.last_host_node is node
    assert tree.total_size() == 2
    assert tree.total_size(Tier.HOST) == 4
    tree.check()
    # load it back: HOST -> LOADING -> BOTH
    tree.start_load(node, slots(50, 2))
    assert tree.match_prefix(RadixKey([1, 2, 3, 4])).host_hit_length == 2  # not valid on L1 yet
    tree.finish_load(node)
    assert tree.match_prefix(RadixKey([1, 2, 3, 4])).device_indices.tolist() == [0, 1, 50, 51]
    tree.check()
    # host eviction only takes host-only leaves
    assert tree.evict_host(10).num_pages == 0
    tree.evict(10, keep_host=True)
    assert tree.total_size() == 0
    ev = tree.evict_host(1)
    assert ev.num_pages == 1
    assert len(ev.host_indices) == 1
    tree.check()


def test_host_insert_and_recompute_adopts_device_slots() -> None:
    tree = RadixTree(page_size=2)
    tree.insert(RadixKey([1, 2]), slots(0, 2))
    assert tree.insert_host(RadixKey([1, 2, 3, 4, 5, 6]), slots(100, 6)) == 2
    r = tree.match_prefix(RadixKey([1, 2, 3, 4, 5, 6]))
    assert (r.device_hit_length, r.host_hit_length) == (2, 4)
    tree.check()
    # the KV was recomputed on device: host-only nodes adopt the new device slots
    assert tree.insert(RadixKey([1, 2, 3, 4, 5, 6]), slots(10, 6)) == 2
    r = tree.match_prefix(RadixKey([1, 2, 3, 4, 5, 6]))
    assert r.device_indices.tolist() == [0, 1, 12, 13, 14, 15]
    assert r.last_device_node.state is NodeState.BOTH
    tree.check()


def test_drop_subtree_returns_host_slots_and_host_lock_blocks_it() -> None:
    tree = RadixTree(page_size=1)
    tree.insert(RadixKey([1, 2]), slots(0, 2))
    tree.insert_host(RadixKey([1, 2, 3]), slots(100, 3))
    host_node = tree.match_prefix(RadixKey([1, 2, 3])).last_host_node
    tree.lock_host(host_node)
    assert tree.evict(10).num_pages == 0  # dropping [1, 2] would drop a host-locked copy
    tree.check()
    tree.unlock_host(host_node)
    ev = tree.evict(10)
    assert sorted(ev.device_indices.tolist()) == [0, 1]
    assert ev.host_indices.tolist() == [102]
    assert host_node.state is NodeState.REMOVED
    tree.check()


def test_transitions_reject_wrong_states() -> None:
    tree = RadixTree(page_size=1)
    tree.insert(RadixKey([1, 2]), slots(0, 2))
    node = tree.match_prefix(RadixKey([1, 2])).last_device_node
    with pytest.raises(IndexStateError, match="BACKING_UP"):
        tree.finish_backup(node)
    with pytest.raises(IndexStateError, match="HOST"):
        tree.start_load(node, slots(5, 2))
    tree.start_backup(node, slots(10, 2))
    assert tree.total_size(Tier.HOST) == 2
    tree.check()
    assert tree.evict(10).num_pages == 0  # in flight: not evictable
    assert tree.cancel_backup(node).tolist() == [10, 11]
    assert tree.total_size(Tier.HOST) == 0
    tree.check()
    tree.start_backup(node, slots(10, 2))
    tree.finish_backup(node)
    assert tree.drop_host(node).tolist() == [10, 11]
    assert node.state is NodeState.DEVICE
    tree.check()


def test_cancel_load_rolls_back() -> None:
    tree = RadixTree(page_size=1)
    tree.insert_host(RadixKey([7, 8]), slots(0, 2))
    node = tree.match_prefix(RadixKey([7, 8])).last_host_node
    tree.lock(node)
    tree.start_load(node, slots(40, 2))
    assert tree.protected_size() == 2
    tree.check()
    assert tree.cancel_load(node).tolist() == [40, 41]
    tree.unlock(node)
    assert node.state is NodeState.HOST
    assert tree.total_size() == 0
    tree.check()


def test_bad_indices_are_clear_errors() -> None:
    tree = RadixTree(page_size=2)
    key = RadixKey([1, 2, 3, 4])
    with pytest.raises(RadixInputError, match="int64"):
        tree.insert(key, torch.arange(4, dtype=torch.int32))
    with pytest.raises(RadixInputError, match="1-D"):
        tree.insert(key, torch.zeros((2, 2), dtype=torch.int64))
    with pytest.raises(RadixInputError, match="3 slots for 4 tokens"):
        tree.insert(key, slots(0, 3))
    with pytest.raises(RadixInputError, match=r"torch\.Tensor"):
        tree.insert(key, [0, 1, 2, 3])  # type: ignore[arg-type]
    with pytest.raises(RadixInputError, match="whole pages of 2 slots"):
        tree.insert(key, slots(1, 4))  # pages start at multiples of the page size
    with pytest.raises(RadixInputError, match="whole pages of 2 slots"):
        tree.insert(key, torch.tensor([0, 1, 3, 2]))  # in order inside a page
    with pytest.raises(RadixInputError, match="page_size"):
        RadixTree(page_size=0)
    tree.check()
    assert tree.total_size() == 0


def test_insert_copies_the_callers_slots() -> None:
    tree = RadixTree(page_size=1)
    mine = slots(0, 3)
    tree.insert(RadixKey([1, 2, 3]), mine)
    mine.fill_(-1)
    assert tree.match_prefix(RadixKey([1, 2, 3])).device_indices.tolist() == [0, 1, 2]


def test_insert_stops_at_a_loading_node() -> None:
    """Nothing below a LOADING node may hold device pages (its load may roll back to HOST):
    an insert through it stops there and counts the rest as cached, for the caller to free."""
    tree = RadixTree(page_size=1)
    tree.insert_host(RadixKey([1, 2, 3]), slots(100, 3))
    node = tree.match_prefix(RadixKey([1, 2])).last_host_node  # splits off [3]: a HOST child
    tree.lock(node)
    tree.start_load(node, slots(0, 2))
    # another request recomputed [1, 2, 3] and adds [4]: nothing of it goes in
    assert tree.insert(RadixKey([1, 2, 3, 4]), slots(10, 4)) == 4
    r = tree.match_prefix(RadixKey([1, 2, 3, 4]))
    assert (r.device_hit_length, r.host_hit_length) == (0, 3)  # [3] was not adopted
    tree.check()
    assert tree.cancel_load(node).tolist() == [0, 1]  # the rollback holds
    tree.check()
    tree.start_load(node, slots(0, 2))
    tree.finish_load(node)
    assert tree.insert(RadixKey([1, 2, 3, 4]), slots(10, 4)) == 2  # now it goes in below
    assert tree.match_prefix(RadixKey([1, 2, 3, 4])).device_indices.tolist() == [0, 1, 12, 13]
    tree.unlock(node)
    tree.check()


def test_insert_without_copy_keeps_views() -> None:
    tree = RadixTree(page_size=1)
    mine = slots(0, 3)
    tree.insert(RadixKey([1, 2, 3]), mine, copy=False)
    got = tree.match_prefix(RadixKey([1, 2, 3])).device_indices
    assert got.data_ptr() == mine.data_ptr()
    tree.check()


def test_clear_returns_everything_and_refuses_while_locked() -> None:
    tree = RadixTree(page_size=1)
    tree.insert(RadixKey([1, 2]), slots(0, 2))
    tree.insert(RadixKey([1, 2], "t"), slots(10, 2))
    tree.insert_host(RadixKey([1, 2, 3]), slots(100, 3))
    node = tree.match_prefix(RadixKey([1, 2])).last_device_node
    tree.lock(node)
    with pytest.raises(IndexStateError, match="locked"):
        tree.clear()
    tree.unlock(node)
    ev = tree.clear()
    assert sorted(ev.device_indices.tolist()) == [0, 1, 10, 11]
    assert ev.host_indices.tolist() == [102]
    assert ev.num_pages == 5
    assert tree.total_size() == tree.total_size(Tier.HOST) == 0
    assert tree.stats()["namespaces"] == 1
    tree.check()
    assert tree.insert(RadixKey([1, 2]), slots(20, 2)) == 0
    tree.check()


def test_split_keeps_the_written_flag() -> None:
    tree = RadixTree(page_size=1)
    tree.insert(RadixKey([1, 2, 3]), slots(0, 3))
    node = tree.match_prefix(RadixKey([1, 2, 3])).last_device_node
    node.written = True  # the write-back commit sets it
    upper = tree.match_prefix(RadixKey([1, 9])).last_device_node
    assert upper is not node
    assert upper.written
    assert node.written


def test_nodes_keep_one_page_index_per_page() -> None:
    tree = RadixTree(page_size=4)
    tree.insert(RadixKey(range(10)), slots(8, 10))  # pages 2 and 3; the partial tail is not kept
    r = tree.match_prefix(RadixKey(range(8)))
    assert r.device_pages.tolist() == [2, 3]
    assert r.device_indices.tolist() == list(range(8, 16))
    assert r.device_hit_length == 8
    node = r.last_device_node
    assert node.device_pages is not None
    assert node.device_pages.tolist() == [2, 3]
    assert node.device_indices is not None
    assert node.device_indices.tolist() == list(range(8, 16))
    assert node.host_indices is None
    tree.check()


@pytest.mark.parametrize("page", [2, 3, 4])
def test_page_checks_agree_on_every_path(page: int) -> None:
    """The numpy check (CPU) and the torch one (other devices) accept and reject alike."""
    tree = RadixTree(page_size=page)
    good = torch.tensor([5, 1, 7], dtype=torch.int64).repeat_interleave(page) * page
    good += torch.arange(page).repeat(3)
    cases = [good, good.flip(0), good + 1, good.clone().index_fill_(0, torch.tensor([1]), 99)]
    for case in cases:
        pages, ok = pages_of(case, page)
        try:
            got = tree._to_pages(case, "slots")
        except RadixInputError:
            assert not ok
        else:
            assert ok
            assert torch.equal(got, pages)
    assert pages_of(good, page)[0].tolist() == [5, 1, 7]


def test_page_one_keeps_int32_slots_when_they_fit() -> None:
    tree = RadixTree(page_size=1)
    tree.insert(RadixKey([1, 2]), slots(0, 2))
    tree.insert(RadixKey([1, 2, 3]), torch.tensor([0, 1, 2**40]))  # does not fit: stays int64
    r = tree.match_prefix(RadixKey([1, 2, 3]))
    assert r.device_indices.dtype == torch.int64
    assert r.device_indices.tolist() == [0, 1, 2**40]
    first, second = tree.path(r.last_device_node)
    assert first.device_pages is not None
    assert first.device_pages.dtype == torch.int32
    assert second.device_pages is not None
    assert second.device_pages.dtype == torch.int64
    assert tree.evict(3).device_indices.tolist() == [2**40, 0, 1]
    tree.check()


@pytest.mark.parametrize("page_size", [1, 4])
def test_insert_pages_builds_the_same_tree_as_insert(page_size: int) -> None:
    def slots(pages: list[int]) -> torch.Tensor:
        return torch.tensor(
            [p * page_size + i for p in pages for i in range(page_size)], dtype=torch.int64
        )

    by_slots, by_pages = RadixTree(page_size=page_size), RadixTree(page_size=page_size)
    prompts = [
        (list(range(8 * page_size)), list(range(8))),
        (list(range(4 * page_size)) + [99] * (4 * page_size), [0, 1, 2, 3, 20, 21, 22, 23]),
        (list(range(10 * page_size)), list(range(10))),  # extends the first prompt
    ]
    for tokens, pages in prompts:
        a = by_slots.insert(RadixKey(tokens), slots(pages))
        b = by_pages.insert_pages(RadixKey(tokens), torch.tensor(pages, dtype=torch.int64))
        assert a == b
        by_pages.check()
    for tokens, _ in prompts:
        ma, mb = by_slots.match_prefix(RadixKey(tokens)), by_pages.match_prefix(RadixKey(tokens))
        assert torch.equal(ma.device_indices, mb.device_indices)
        assert ma.device_hit_length == len(tokens)


def test_insert_pages_checks_its_input() -> None:
    tree = RadixTree(page_size=4)
    with pytest.raises(RadixInputError, match="whole pages"):
        tree.insert_pages(RadixKey(list(range(6))), torch.tensor([0], dtype=torch.int64))
    with pytest.raises(RadixInputError, match="device_pages"):
        tree.insert_pages(RadixKey(list(range(8))), torch.tensor([0], dtype=torch.int64))
    with pytest.raises(RadixInputError, match="int64"):
        tree.insert_pages(RadixKey(list(range(8))), torch.tensor([0, 1], dtype=torch.int32))
    tree.check()


def test_find_is_read_only_and_stops_at_whole_nodes() -> None:
    tree = RadixTree(page_size=2)
    tree.insert(RadixKey([1, 2, 3, 4, 5, 6]), torch.arange(6))
    node = tree.find(RadixKey([1, 2, 3, 4, 5, 6, 7]))  # a partial page is ignored
    assert node.num_tokens == 6
    assert node.hit_count == 0  # no hit counted...
    before = (node.last_access, len(tree.root.children))
    assert tree.find(RadixKey([1, 2, 3, 4])) is tree.root  # ...no split where a key ends inside
    assert tree.find(RadixKey([1, 2, 9, 9, 5, 6])) is tree.root  # diverges inside the node
    assert (node.last_access, len(tree.root.children)) == before
    assert tree.find(RadixKey([1, 2], extra_key="other")) is tree.root  # unknown namespace
    tree.check()
