from __future__ import annotations

import pytest
import torch

from hicache_async.errors import IndexStateError
from hicache_async.memory import PagedAllocator


def pages(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_alloc_until_exhausted_then_none() -> None:
    alloc = PagedAllocator(8, first_page=1)
    assert (alloc.usable, alloc.available, alloc.used) == (7, 7, 0)
    first = alloc.alloc(5)
    assert first is not None
    assert sorted(first.tolist()) == [1, 2, 3, 4, 5]
    assert alloc.alloc(3) is None  # only 2 left: nothing is taken
    assert alloc.available == 2
    rest = alloc.alloc(2)
    assert rest is not None
    assert alloc.available == 0
    assert alloc.alloc(1) is None
    assert alloc.alloc(0) is not None


def test_freed_pages_come_back() -> None:
    alloc = PagedAllocator(4)
    got = alloc.alloc(4)
    assert got is not None
    alloc.free(got[:2])
    alloc.free(got[2:3])
    assert alloc.available == 3
    again = alloc.alloc(3)
    assert again is not None
    assert sorted(again.tolist()) == sorted(got[:3].tolist())


def test_double_free_raises_before_changing_anything() -> None:
    alloc = PagedAllocator(4)
    got = alloc.alloc(2)
    assert got is not None
    alloc.free(got[:1])
    with pytest.raises(IndexStateError, match="double free"):
        alloc.free(got)  # got[0] is already free; got[1] must stay allocated
    assert alloc.is_allocated(got[1:])
    assert alloc.available == 3


def test_same_page_twice_in_one_free() -> None:
    alloc = PagedAllocator(4)
    assert alloc.alloc(4) is not None
    with pytest.raises(IndexStateError, match="same page more than once"):
        alloc.free(pages(1, 1))
    assert alloc.available == 0


@pytest.mark.parametrize("bad", [pages(0), pages(4), pages(-1), pages(2, 9)])
def test_foreign_index(bad: torch.Tensor) -> None:
    alloc = PagedAllocator(4, first_page=1)
    assert alloc.alloc(3) is not None
    with pytest.raises(IndexStateError, match=r"foreign page index: pages must lie in \[1, 4\)"):
        alloc.free(bad)


@pytest.mark.parametrize(
    "bad", [torch.tensor([1], dtype=torch.int32), torch.tensor([[1]], dtype=torch.int64), [1]]
)
def test_index_type_is_checked(bad: object) -> None:
    with pytest.raises(IndexStateError, match="1-D int64 tensor"):
        PagedAllocator(4).free(bad)  # type: ignore[arg-type]


def test_debug_mode_counts_owners() -> None:
    alloc = PagedAllocator(4, debug=True)
    got = alloc.alloc(2)
    assert got is not None
    alloc.share(got)
    assert alloc.owners(got).tolist() == [2, 2]
    alloc.free(got)
    assert alloc.available == 2  # still owned once
    alloc.free(got)
    assert alloc.available == 4
    with pytest.raises(IndexStateError, match="double free"):
        alloc.free(got)


def test_share_needs_debug_mode() -> None:
    alloc = PagedAllocator(4)
    got = alloc.alloc(1)
    assert got is not None
    with pytest.raises(IndexStateError, match="debug=True"):
        alloc.share(got)


def test_clear_frees_everything() -> None:
    alloc = PagedAllocator(6, first_page=2)
    assert alloc.alloc(4) is not None
    alloc.clear()
    assert alloc.available == 4
    got = alloc.alloc(4)
    assert got is not None
    assert sorted(got.tolist()) == [2, 3, 4, 5]


def test_allocation_cost_does_not_scale_with_capacity() -> None:
    """Alloc and free touch what they hand out, never the whole free list: measured as memory
    (numpy reports its buffers to tracemalloc), not time, so a stalled machine cannot fail it.
    A copy of a 4 Mi-page free list would be 32 MiB."""
    import tracemalloc

    def peak_bytes(capacity: int) -> int:
        alloc = PagedAllocator(capacity)
        tracemalloc.start()
        try:
            for _ in range(300):
                got = alloc.alloc(8)
                assert got is not None
                alloc.free(got)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak_bytes(1 << 22) < 1 << 20
    assert peak_bytes(1 << 22) < 4 * max(peak_bytes(1 << 10), 64 << 10)
