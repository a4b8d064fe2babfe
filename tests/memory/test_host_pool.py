from __future__ import annotations

import pytest
import torch

from hicache_async import HostLayout, KVLayout
from hicache_async.errors import IndexStateError, LayoutError
from hicache_async.memory import HostKVPool, pages_to_slots, slots_to_pages

MHA = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype="bfloat16", page_size=4)
MLA = KVLayout(num_layers=3, use_mla=True, kv_lora_rank=6, qk_rope_head_dim=2, page_size=2)
LAYOUTS = list(HostLayout)


def fill_random(pool: HostKVPool, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    pool.buffer.view(torch.uint8).copy_(
        torch.randint(0, 256, pool.buffer.view(torch.uint8).shape, generator=gen, dtype=torch.uint8)
    )


def canonical_page(pool: HostKVPool, page: int) -> bytes:
    """A page's bytes by indexing the typed buffer: layer, then plane, then tokens."""
    ps = pool.page_size
    parts = []
    for layer in range(pool.layout.num_layers):
        for plane in range(pool.layout.kv_planes):
            if pool.is_page_first:
                block = pool.buffer[page, layer, plane]
            else:
                block = pool.buffer[layer, plane, page * ps : (page + 1) * ps]
            parts.append(block.contiguous().view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


@pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
@pytest.mark.parametrize("host_layout", LAYOUTS)
def test_segments_are_canonical_order(layout: KVLayout, host_layout: HostLayout) -> None:
    pool = HostKVPool(layout, 5, host_layout)
    fill_random(pool)
    for page in range(5):
        segments = pool.page_segments(page)
        expected_count = 1 if pool.is_page_first else layout.num_layers * layout.kv_planes
        assert len(segments) == expected_count
        assert sum(s.nbytes for s in segments) == layout.bytes_per_page
        assert b"".join(bytes(s) for s in segments) == canonical_page(pool, page)
        assert pool.get_data_page(page).numpy().tobytes() == canonical_page(pool, page)


@pytest.mark.parametrize("host_layout", LAYOUTS)
def test_segment_views_write_straight_into_the_pool(host_layout: HostLayout) -> None:
    pool = HostKVPool(MHA, 4, host_layout)
    pool.buffer.zero_()
    payload = bytes(range(256)) * (MHA.bytes_per_page // 256 + 1)
    offset = 0
    for view in pool.page_segments(2):
        view[:] = payload[offset : offset + view.nbytes]
        offset += view.nbytes
    assert canonical_page(pool, 2) == payload[: MHA.bytes_per_page]
    assert canonical_page(pool, 1) == bytes(MHA.bytes_per_page)  # neighbours untouched
    assert canonical_page(pool, 3) == bytes(MHA.bytes_per_page)


@pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
@pytest.mark.parametrize("source", LAYOUTS)
@pytest.mark.parametrize("target", LAYOUTS)
def test_flat_page_round_trip_across_layouts(
    layout: KVLayout, source: HostLayout, target: HostLayout
) -> None:
    src, dst = HostKVPool(layout, 3, source), HostKVPool(layout, 3, target)
    fill_random(src, seed=1)
    dst.buffer.zero_()
    for page in range(3):
        dst.set_from_flat_data_page(2 - page, src.get_data_page(page))
    for page in range(3):
        assert canonical_page(dst, 2 - page) == canonical_page(src, page)


def test_page_first_data_page_is_a_view() -> None:
    pool = HostKVPool(MHA, 2, HostLayout.PAGE_FIRST)
    pool.buffer.zero_()
    pool.get_data_page(1).fill_(7)
    assert int(pool.buffer[1].view(torch.uint8).min()) == 7
    assert int(pool.buffer[0].view(torch.uint8).max()) == 0


def test_flat_page_of_the_wrong_size() -> None:
    pool = HostKVPool(MHA, 2)
    with pytest.raises(LayoutError, match=f"a page of this layout is {MHA.bytes_per_page} bytes"):
        pool.set_from_flat_data_page(0, torch.zeros(10, dtype=torch.uint8))


@pytest.mark.parametrize("page", [-1, 2])
def test_page_outside_pool(page: int) -> None:
    pool = HostKVPool(MHA, 2)
    with pytest.raises(IndexStateError, match=r"outside the pool \[0, 2\)"):
        pool.page_segments(page)


def test_pool_owns_an_allocator_and_reports_size() -> None:
    pool = HostKVPool(MLA, 6)
    assert pool.allocator.available == 6
    assert pool.nbytes == 6 * MLA.bytes_per_page
    assert not pool.pinned or torch.cuda.is_available()


def test_slots_and_pages() -> None:
    got = pages_to_slots(torch.tensor([3, 1], dtype=torch.int64), 4)
    assert got.tolist() == [12, 13, 14, 15, 4, 5, 6, 7]
    assert slots_to_pages(got, 4).tolist() == [3, 1]
    with pytest.raises(LayoutError, match="not whole pages of 4"):
        slots_to_pages(got[:6], 4)
    with pytest.raises(LayoutError, match="not whole, in-order pages"):
        slots_to_pages(got.flip(0), 4)
