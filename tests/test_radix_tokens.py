"""How nodes keep their token ids: int32 when they fit, int64 otherwise, always owned copies."""

from __future__ import annotations

from array import array

import numpy as np
import pytest
import torch

from hicache_async.radix import RadixInputError, RadixKey, RadixTree, TreeNode


def _tree(page: int) -> RadixTree:
    """A tree that narrows every span it can (by default only spans past 512 tokens)."""
    tree = RadixTree(page_size=page)
    tree.narrow_min_tokens = 0
    return tree


def _slots(lo: int, n: int) -> torch.Tensor:
    return torch.arange(lo, lo + n, dtype=torch.int64)


def _le64(ids: list[int]) -> bytes:
    return np.asarray(ids, dtype="<i8").tobytes()


def _nodes(tree: RadixTree) -> list[TreeNode]:
    out: list[TreeNode] = []
    stack = list(tree._roots.values())
    while stack:
        n = stack.pop()
        stack.extend(n.children.values())
        if n.parent is not None:
            out.append(n)
    return out


@pytest.mark.parametrize("page", [1, 2, 4])
def test_narrow_and_wide_nodes_match_exactly(page: int) -> None:
    tree = _tree(page)
    small = list(range(8))
    # Same low 32 bits as ``small`` but different ids: must never match each other.
    aliased = [t + 2**32 for t in small]
    negative = [-1 - t for t in small]
    for i, ids in enumerate((small, aliased, negative)):
        assert tree.insert(RadixKey(ids), _slots(100 * i, 8)) == 0
        tree.check()
    dtypes = {tuple(n.key): n.tokens.dtype for n in _nodes(tree)}
    assert sorted(str(d) for d in dtypes.values()) == ["int32", "int64", "int64"]
    for i, ids in enumerate((small, aliased, negative)):
        r = tree.match_prefix(RadixKey(ids))
        assert r.device_hit_length == 8
        assert r.device_indices.tolist() == list(range(100 * i, 100 * i + 8))
    assert tree.match_prefix(RadixKey([2**31, *small[1:]])).device_hit_length == 0


@pytest.mark.parametrize("page", [1, 2])
def test_split_between_narrow_and_wide_ids(page: int) -> None:
    tree = _tree(page)
    ids = [1, 2, 3, 4, 2**40, 6, 7, 8]
    tree.insert(RadixKey(ids), _slots(0, 8))
    (node,) = _nodes(tree)
    assert node.tokens.dtype == np.int64
    # Diverges after the narrow part: the upper part keeps int64 ids that fit int32 (allowed).
    assert tree.insert(RadixKey([1, 2, 3, 4, 5, 6]), _slots(8, 6)) == 4
    tree.check()
    assert tree.match_prefix(RadixKey(ids)).device_hit_length == 8
    assert tree.match_prefix(RadixKey([1, 2, 3, 4, 5, 6])).device_hit_length == 6
    assert tree.match_prefix(RadixKey([1, 2, 3, 4, 2**40 + 1])).device_hit_length == 4
    for n in _nodes(tree):
        assert n.key == _le64(tree.path_key(n).token_ids()[-n.num_tokens :])


def test_node_key_and_edge_are_int64_bytes() -> None:
    tree = _tree(2)
    tree.insert(RadixKey([5, 6, 7, 8]), _slots(0, 4))
    (node,) = _nodes(tree)
    assert node.tokens.dtype == np.int32
    with pytest.raises(ValueError, match="read-only"):
        node.tokens[0] = 9  # the ids are the index: readers cannot change them
    assert node.key == _le64([5, 6, 7, 8])
    assert node.edge == _le64([5, 6])
    assert tree.root.children[node.edge] is node
    assert tree.path_key(node) == RadixKey([5, 6, 7, 8])


def test_nodes_own_their_ids_when_the_key_is_a_view() -> None:
    tree = _tree(2)
    ids = array("q", [1, 2, 3, 4, 5, 6])
    key = RadixKey(ids, copy=False)
    tree.insert(key, _slots(0, 6))
    del key
    ids[2] = 99  # the caller reuses its buffer: the tree must not see it
    (node,) = _nodes(tree)
    assert node.key == _le64([1, 2, 3, 4, 5, 6])
    assert tree.match_prefix(RadixKey([1, 2, 3, 4, 5, 6])).device_hit_length == 6
    assert tree.match_prefix(RadixKey(ids)).device_hit_length == 2


def test_split_keeps_a_view_only_for_the_larger_part() -> None:
    tree = _tree(2)
    tree.insert(RadixKey(list(range(12))), _slots(0, 12))
    (node,) = _nodes(tree)
    whole = node.tokens
    tree.match_prefix(RadixKey([0, 1, 2, 3, 9, 9]))  # splits after 4 tokens
    upper, lower = sorted(_nodes(tree), key=lambda n: n.num_tokens)
    assert (upper.num_tokens, lower.num_tokens) == (4, 8)
    assert upper.tokens.base is None  # the smaller part: a copy, so it never pins ``whole``
    assert lower.tokens.base is whole  # the larger part: a view, no copy
    assert not upper.tokens.flags.writeable
    assert not lower.tokens.flags.writeable
    assert not np.shares_memory(upper.tokens, lower.tokens)
    assert lower.edge == _le64([4, 5])
    assert upper.children[lower.edge] is lower
    tree.check()
    # The view is split again where it is less than half of ``whole``: both parts are copies.
    tree.match_prefix(RadixKey([0, 1, 2, 3, 4, 5, 6, 7, 9, 9]))
    parts = sorted(_nodes(tree), key=lambda n: n.tokens[0])
    assert [p.num_tokens for p in parts] == [4, 4, 4]
    assert all(p.tokens.base is None for p in parts)
    assert [int(t) for p in parts for t in p.tokens] == list(range(12))
    tree.check()


def test_a_split_by_eviction_copies_only_the_part_that_stays() -> None:
    tree = _tree(2)
    tree.insert(RadixKey(list(range(12))), _slots(0, 12))
    (node,) = _nodes(tree)
    whole = node.tokens
    evicted = tree.evict(4)  # 8 tokens: the tail goes, the first 4 stay
    assert evicted.removed == [node]
    assert node.tokens.base is whole
    (kept,) = _nodes(tree)
    assert kept.tokens.base is None
    assert [int(t) for t in kept.tokens] == [0, 1, 2, 3]
    tree.check()


def test_hashes_of_narrow_and_wide_nodes() -> None:
    from hicache_async.radix import page_hashes

    tree = _tree(2)
    tree.insert(RadixKey([1, 2, 3, 4]), _slots(0, 4))
    (node,) = _nodes(tree)
    assert tree.page_hashes(node) == page_hashes([1, 2, 3, 4], 2)
    tree.insert(RadixKey([2**31 - 1, 0, 7, 7]), _slots(4, 4))  # the largest int32 id
    edge = tree.match_prefix(RadixKey([2**31 - 1, 0])).last_device_node
    assert edge.tokens.dtype == np.int32
    assert tree.page_hashes(edge) == page_hashes([2**31 - 1, 0], 2)
    tree.insert(RadixKey([2**31, 0]), _slots(8, 2))
    wide = tree.match_prefix(RadixKey([2**31, 0])).last_device_node
    assert wide.tokens.dtype == np.int64
    with pytest.raises(RadixInputError, match="int32"):
        tree.page_hashes(wide)  # as for any key: hashes need ids that fit int32


def test_narrow_hashes_equal_the_int64_path() -> None:
    from hicache_async.radix import hash_pages
    from hicache_async.radix.hashing import hash_narrow_pages

    ids = [0, 1, 2**31 - 1, 70000, 5, 6]
    wide = np.asarray(ids, dtype="<i8").tobytes()
    narrow = np.asarray(ids, dtype="<i4").tobytes()
    for extra, parent in ((None, None), ("ns", None), (None, "ab" * 32)):
        assert hash_narrow_pages(narrow, 2, extra, parent) == hash_pages(wide, 2, extra, parent)


@pytest.mark.parametrize("page", [1, 4])
@pytest.mark.parametrize("where", [0, 1, 63, 64, 65, 255, 256, 257, 1000, 5000, 8191])
def test_split_point_in_long_nodes(page: int, where: int) -> None:
    """The common prefix of a long node and a key that leaves it anywhere (chunk edges)."""
    n = 8192
    ids = list(range(n))
    for wide in (False, True):
        tree = _tree(page)
        base = [t + (2**40 if wide else 0) for t in ids]
        tree.insert(RadixKey(base), _slots(0, n))
        other = [*base[:where], -5, *base[where + 1 :]]
        got = tree.match_prefix(RadixKey(other)).device_hit_length
        assert got == where - where % page
        shorter = tree.match_prefix(RadixKey(base[: where + 1])).device_hit_length
        assert shorter == (where + 1) - (where + 1) % page
        tree.check()


def test_only_long_spans_are_narrowed_by_default() -> None:
    tree = RadixTree(page_size=4)
    n = tree.narrow_min_tokens
    tree.insert(RadixKey(list(range(n))), _slots(0, n))
    tree.insert(RadixKey(list(range(10**6, 10**6 + n + 4))), _slots(n, n + 4))
    short, long = sorted(_nodes(tree), key=lambda x: x.num_tokens)
    assert short.tokens.dtype == np.int64  # 4 bytes a token less would cost two numpy calls
    assert long.tokens.dtype == np.int32
    tree.check()
