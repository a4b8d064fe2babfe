"""Radix keys (compact token bytes, input checks) and the chained SHA-256 page hashes."""

from __future__ import annotations

import hashlib
import struct
from array import array

import numpy as np
import pytest
import torch

from hicache_async.errors import HiCacheError
from hicache_async.radix import RadixInputError, RadixKey, RadixTree, page_hashes


def _simple_chain(tokens: list[int], page: int, extra: str | None = None) -> list[str]:
    """The documented formula, written out independently."""
    out: list[str] = []
    prev: bytes | None = None
    for i in range(0, len(tokens) - page + 1, page):
        body = b"".join(struct.pack("<i", t) for t in tokens[i : i + page])
        start = b""
        if extra is not None:
            start = hashlib.sha256(b"hicache-extra-key\x00" + extra.encode("utf-8")).digest()
        head = start if prev is None else prev
        prev = hashlib.sha256(head + body).digest()
        out.append(prev.hex())
    return out


@pytest.mark.parametrize(
    "ids",
    [
        [1, 2, 3, 70000],
        (1, 2, 3, 70000),
        array("q", [1, 2, 3, 70000]),
        array("i", [1, 2, 3, 70000]),
        np.array([1, 2, 3, 70000], dtype=np.int64),
        np.array([1, 2, 3, 70000], dtype=np.uint32),
        torch.tensor([1, 2, 3, 70000]),
        torch.tensor([1, 2, 3, 70000], dtype=torch.int32),
    ],
)
@pytest.mark.parametrize("copy", [True, False])
def test_key_from_any_int_sequence(ids: object, copy: bool) -> None:
    key = RadixKey(ids, copy=copy)  # type: ignore[arg-type]
    assert key.data == struct.pack("<4q", 1, 2, 3, 70000)
    assert len(key) == 4
    assert key.token_ids() == [1, 2, 3, 70000]
    assert key == RadixKey([1, 2, 3, 70000])
    assert hash(key) == hash(RadixKey([1, 2, 3, 70000]))
    assert key != RadixKey([1, 2, 3, 70000], extra_key="x")


def test_key_without_copy_views_the_callers_buffer() -> None:
    ids = array("q", [1, 2, 3, 4])
    key = RadixKey(ids, copy=False)
    ids[0] = 9  # the caller promised not to; a view sees it
    assert key.token_ids() == [9, 2, 3, 4]
    with pytest.raises(BufferError):
        ids.append(5)  # an array cannot be resized while a key views it
    assert RadixKey(ids).token_ids() == [9, 2, 3, 4]  # the default copies
    head = key.prefix(2)
    assert head.token_ids() == [9, 2]
    assert head.extra_key is None
    with pytest.raises(RadixInputError, match="prefix of 5 tokens"):
        key.prefix(5)
    with pytest.raises(RadixInputError, match="format 'B'"):
        RadixKey(memoryview(ids), copy=False)
    tree = RadixTree(page_size=2)
    tree.insert(key, torch.arange(4))
    ids[1] = 7  # the tree stored its own copy
    assert tree.match_prefix(RadixKey([9, 2, 3, 4])).device_hit_length == 4
    tree.check()


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 2), dtype=np.int64),
        np.array([1.0, 2.0]),
        torch.tensor([1.5]),
        [2**63],
        np.array([2**64 - 1], dtype=np.uint64),
        ["a"],
        b"abc",
    ],
)
def test_key_rejects_bad_input(bad: object) -> None:
    with pytest.raises(RadixInputError) as exc:
        RadixKey(bad)  # type: ignore[arg-type]
    assert isinstance(exc.value, HiCacheError)
    assert isinstance(exc.value, ValueError)


def test_extra_key_must_be_str() -> None:
    with pytest.raises(RadixInputError, match="extra_key"):
        RadixKey([1], extra_key=3)  # type: ignore[arg-type]


def test_page_hashes_known_vectors() -> None:
    toks = list(range(1, 9))
    got = page_hashes(toks, 4)
    assert got == _simple_chain(toks, 4)
    # Pinned: changing this changes every L3 key and every KV-event block hash.
    assert got[0] == hashlib.sha256(struct.pack("<4i", 1, 2, 3, 4)).hexdigest()
    assert got[0] == PINNED_FIRST


PINNED_FIRST = "cf97adeedb59e05bfd73a2b4c2a8885708c4f4f70c84c64b27120e72ab733b72"


def test_page_hashes_need_int32_token_ids() -> None:
    assert page_hashes([2**31 - 1], 1) == _simple_chain([2**31 - 1], 1)
    with pytest.raises(RadixInputError, match="int32"):
        page_hashes([2**31], 1)


def test_page_hashes_chain_extra_key_and_partial_page() -> None:
    toks = [5, 6, 7, 8, 9, 10, 11]
    assert page_hashes(toks, 2) == _simple_chain(toks, 2)  # the partial tail page is ignored
    assert len(page_hashes(toks, 2)) == 3
    with_extra = page_hashes(toks, 2, extra_key="tenant-a")
    assert with_extra == _simple_chain(toks, 2, "tenant-a")
    assert with_extra[0] != page_hashes(toks, 2)[0]
    # continuing a chain from a parent hash gives the tail of the whole chain
    whole = page_hashes(toks, 2, extra_key="t")
    assert page_hashes(toks[4:], 2, parent_hash=whole[1]) == whole[2:]
    assert page_hashes(toks, 1) == _simple_chain(toks, 1)


def test_an_extra_key_cannot_continue_another_chain() -> None:
    """A 32-byte extra key equal to a page's digest must not give that page's continuation:
    its namespace would read another namespace's L3 pages (KV computed after a prefix the
    request does not have)."""
    toks = [5, 6, 7, 8]
    digest = bytes(range(65, 65 + 32))  # stands for some page's digest; valid UTF-8
    continued = page_hashes(toks, 2, parent_hash=digest.hex())
    assert page_hashes(toks, 2, extra_key=digest.decode()) != continued
    # Nor a short key that equals a parent hash given as hex.
    assert page_hashes(toks, 2, extra_key="t") != page_hashes(toks, 2, parent_hash=b"t".hex())


def test_tree_hashes_are_lazy_cached_and_survive_splits() -> None:
    tree = RadixTree(page_size=2)
    toks = list(range(10))
    tree.insert(RadixKey(toks, "ns"), torch.arange(10))
    node = tree.match_prefix(RadixKey(toks, "ns")).last_device_node
    assert node.hashes is None  # nothing hashed on insert or match
    full = tree.path_hashes(node)
    assert full == _simple_chain(toks, 2, "ns")
    # a split keeps both halves' cached hashes
    tree.insert(RadixKey([*toks[:4], 99, 99], "ns"), torch.arange(20, 26))
    upper = tree.match_prefix(RadixKey(toks[:4], "ns")).last_device_node
    assert upper.hashes == full[:2]
    assert tree.page_hashes(node) == full[2:]
    other = tree.match_prefix(RadixKey([*toks[:4], 99, 99], "ns")).last_device_node
    assert tree.path_hashes(other) == _simple_chain([*toks[:4], 99, 99], 2, "ns")
    tree.check()


def test_removed_nodes_still_hash_for_kv_events() -> None:
    tree = RadixTree(page_size=2)
    toks = list(range(8))
    tree.insert(RadixKey(toks, "t"), torch.arange(8))
    ev = tree.evict(1)  # the tail page leaves the tree
    (gone,) = ev.removed
    assert tree.page_hashes(gone) == _simple_chain(toks, 2, "t")[3:]
    assert tree.path_key(gone) == RadixKey(toks, "t")
    tree.check()
