from __future__ import annotations

import pytest
import torch

from hicache_async import KVLayout
from hicache_async.errors import IndexStateError, LayoutError
from hicache_async.memory import DeviceKVPool, slots_to_pages

MHA = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype="bfloat16", page_size=4)
MLA = KVLayout(num_layers=2, use_mla=True, kv_lora_rank=6, qk_rope_head_dim=2, page_size=2)


def test_buffers_have_the_per_layer_shape_and_a_padding_page() -> None:
    pool = DeviceKVPool(MHA, 5, device="cpu")
    assert pool.num_tokens == 6 * 4
    for layer in range(3):
        k, v = pool.get_kv_buffer(layer)
        assert k.shape == v.shape == (24, 2, 4)
        assert k.dtype == torch.bfloat16
        assert k.is_contiguous()
        assert k.data_ptr() == pool.get_key_buffer(layer).data_ptr()
        assert v.data_ptr() == pool.get_value_buffer(layer).data_ptr()
        assert k.data_ptr() != v.data_ptr()
    assert pool.allocator.usable == 5
    pages = pool.allocator.alloc(5)
    assert pages is not None
    assert 0 not in pages.tolist()
    assert pool.nbytes == 6 * MHA.bytes_per_page


def test_set_kv_buffer_writes_the_slots_and_nothing_else() -> None:
    pool = DeviceKVPool(MHA, 5, device="cpu")
    loc = pool.alloc_slots(6)
    assert loc is not None
    assert loc.numel() == 8
    k = torch.randn(8, 2, 4).to(torch.bfloat16)
    v = torch.randn(8, 2, 4).to(torch.bfloat16)
    pool.set_kv_buffer(1, loc, k, v)
    assert torch.equal(pool.get_key_buffer(1)[loc], k)
    assert torch.equal(pool.get_value_buffer(1)[loc], v)
    assert pool.get_key_buffer(0).abs().sum() == 0
    assert pool.get_key_buffer(1)[:4].abs().sum() == 0  # padding page untouched
    pool.free_slots(loc)
    assert pool.allocator.used == 0


def test_mla_pool_has_one_latent_plane() -> None:
    pool = DeviceKVPool(MLA, 3, device="cpu")
    assert pool.kv.shape == (2, 1, 8, 1, 8)
    loc = torch.tensor([2, 3], dtype=torch.int64)
    latent = torch.randn(2, 1, 8).to(torch.bfloat16)
    pool.set_kv_buffer(0, loc, latent)
    k, v = pool.get_kv_buffer(0)
    assert torch.equal(k[loc], latent)
    assert v.data_ptr() == k.data_ptr()
    with pytest.raises(LayoutError, match="MLA"):
        pool.set_kv_buffer(0, loc, latent, latent)
    with pytest.raises(LayoutError, match="value buffer"):
        pool.get_value_buffer(0)


@pytest.mark.parametrize(
    ("k_shape", "dtype", "loc", "match"),
    [
        ((3, 2, 4), torch.bfloat16, [4, 5], r"\(2, 2, 4\)"),
        ((2, 1, 4), torch.bfloat16, [4, 5], "num_kv_heads"),
        ((2, 2, 4), torch.float32, [4, 5], "bfloat16"),
        ((2, 2, 4), torch.bfloat16, [4, 24], r"\[0, 24\)"),
        ((2, 2, 4), torch.bfloat16, [-1, 5], r"\[0, 24\)"),
    ],
)
def test_set_kv_buffer_rejects_bad_input(k_shape, dtype, loc, match) -> None:
    pool = DeviceKVPool(MHA, 5, device="cpu")
    k = torch.zeros(k_shape, dtype=dtype)
    v = torch.zeros((2, 2, 4), dtype=torch.bfloat16)
    with pytest.raises(LayoutError, match=match):
        pool.set_kv_buffer(0, torch.tensor(loc, dtype=torch.int64), k, v)


def test_set_kv_buffer_rejects_bad_slots_layer_and_missing_v() -> None:
    pool = DeviceKVPool(MHA, 5, device="cpu")
    k = torch.zeros((2, 2, 4), dtype=torch.bfloat16)
    with pytest.raises(LayoutError, match="int64"):
        pool.set_kv_buffer(0, torch.tensor([4, 5], dtype=torch.int32), k, k)
    with pytest.raises(LayoutError, match="layer 3"):
        pool.set_kv_buffer(3, torch.tensor([4, 5]), k, k)
    with pytest.raises(LayoutError, match="both k and v"):
        pool.set_kv_buffer(0, torch.tensor([4, 5]), k)
    with pytest.raises(LayoutError, match="meta"):
        pool.set_kv_buffer(0, torch.tensor([4, 5]), k.to("meta"), k)
    with pytest.raises(LayoutError, match="meta"):
        pool.set_kv_buffer(0, torch.tensor([4, 5], device="meta"), k, k)


def test_free_slots_checks_pages() -> None:
    pool = DeviceKVPool(MHA, 5, device="cpu")
    loc = pool.alloc_slots(4)
    assert loc is not None
    pool.free_slots(loc)
    with pytest.raises(IndexStateError):
        pool.free_slots(loc)
    with pytest.raises(LayoutError):
        slots_to_pages(torch.tensor([1, 2], dtype=torch.int64), 4)
    assert pool.alloc_slots(4 * 6) is None
    with pytest.raises(LayoutError):
        DeviceKVPool(MHA, 0, device="cpu")
