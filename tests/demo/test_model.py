from __future__ import annotations

import torch

from hicache_async.demo.model import TinyCausalLM


class FlatPool:
    """Per-layer K and V tensors indexed by token slot (the DeviceKVPool contract, minimal)."""

    def __init__(self, layers: int, slots: int, heads: int, dim: int) -> None:
        self.k = [torch.full((slots, heads, dim), float("nan")) for _ in range(layers)]
        self.v = [torch.full((slots, heads, dim), float("nan")) for _ in range(layers)]

    def get_key_buffer(self, layer: int) -> torch.Tensor:
        return self.k[layer]

    def get_value_buffer(self, layer: int) -> torch.Tensor:
        return self.v[layer]

    def set_kv_buffer(
        self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None
    ) -> None:
        assert v is not None
        self.k[layer][loc] = k
        self.v[layer][loc] = v


def test_cached_prefix_gives_the_logits_of_recomputation() -> None:
    model = TinyCausalLM(seed=3)
    layout = model.kv_layout(page_size=4)
    pool = FlatPool(layout.num_layers, 64, layout.num_kv_heads, layout.head_dim)
    tokens = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1))
    full = model.forward_full(tokens)
    # Prefill the first 12 tokens into scattered slots, then the rest reading them back.
    first = torch.arange(40, 52)
    rest = torch.tensor([3, 9, 17, 23, 30, 31, 60, 61])
    head = model.forward_cached(tokens[:12], torch.empty(0, dtype=torch.int64), first, pool)
    tail = model.forward_cached(tokens[12:], first, rest, pool)
    assert torch.allclose(head, full[:12], atol=1e-5, rtol=1e-5)
    assert torch.allclose(tail, full[12:], atol=1e-5, rtol=1e-5)


def test_wrong_kv_changes_the_logits() -> None:
    model = TinyCausalLM(seed=3)
    layout = model.kv_layout(page_size=4)
    pool = FlatPool(layout.num_layers, 32, layout.num_kv_heads, layout.head_dim)
    tokens = torch.arange(16)
    prefix = torch.arange(0, 8)
    model.forward_cached(tokens[:8], torch.empty(0, dtype=torch.int64), prefix, pool)
    pool.k[1][5] += 0.5  # one corrupted cached key
    tail = model.forward_cached(tokens[8:], prefix, torch.arange(8, 16), pool)
    assert not torch.allclose(tail, model.forward_full(tokens)[8:], atol=1e-5)


def test_seeded_weights_are_reproducible_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = TinyCausalLM(seed=7), TinyCausalLM(seed=7)
    assert torch.rand(1).item() == expected.item()
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, TinyCausalLM(seed=8).head.weight)
