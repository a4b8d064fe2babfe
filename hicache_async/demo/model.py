"""A small causal transformer whose attention reads K and V from a paged KV pool.

It exists to show (and test) that the cache hands back the right bytes: the logits of a
request computed with a cached prefix must equal those computed from scratch. Random weights
with a fixed seed; RMSNorm, rotary positions, grouped-query attention and a SiLU MLP, as in the
Llama family, at a toy size that runs on a laptop CPU.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import nn

from hicache_async.layout import KVLayout

__all__ = ["KVPool", "TinyCausalLM"]


class KVPool(Protocol):
    """What the model needs from L1 (``DeviceKVPool`` provides it)."""

    def get_key_buffer(self, layer: int) -> torch.Tensor: ...

    def get_value_buffer(self, layer: int) -> torch.Tensor: ...

    def set_kv_buffer(
        self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None
    ) -> None: ...


def _rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Rotary position embedding over the last dimension of ``x`` ``[tokens, heads, dim]``."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q = nn.Linear(dim, heads * head_dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, dim, bias=False)
        self.up = nn.Linear(dim, 4 * dim, bias=False)
        self.gate = nn.Linear(dim, 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def project_kv(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """K (rotated) and V of the new tokens, ``[tokens, kv_heads, head_dim]`` each."""
        k, v = self.kv(self.norm1(h)).view(-1, 2, self.kv_heads, self.head_dim).unbind(1)
        return _rotate(k, positions), v

    def attend(
        self, h: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """The layer's output for the new tokens, attending to every key before them."""
        q = _rotate(self.q(self.norm1(h)).view(-1, self.heads, self.head_dim), positions)
        group = self.heads // self.kv_heads
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q, keys) / math.sqrt(self.head_dim)
        past = keys.shape[0] - h.shape[0]  # cached tokens before the new ones
        mask = torch.ones(h.shape[0], keys.shape[0], dtype=torch.bool).tril(diagonal=past)
        scores = scores.masked_fill(~mask, float("-inf"))
        attended = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        h = h + self.o(attended.reshape(h.shape[0], -1))
        x = self.norm2(h)
        out: torch.Tensor = h + self.down(nn.functional.silu(self.gate(x)) * self.up(x))
        return out


class TinyCausalLM(nn.Module):
    """A decoder-only transformer with random weights, seeded for reproducibility."""

    def __init__(
        self,
        *,
        vocab: int = 512,
        dim: int = 64,
        layers: int = 4,
        heads: int = 4,
        kv_heads: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.embed = nn.Embedding(vocab, dim)
            self.blocks = nn.ModuleList(
                _Layer(dim, heads, kv_heads, dim // heads) for _ in range(layers)
            )
            self.norm = nn.RMSNorm(dim)
            self.head = nn.Linear(dim, vocab, bias=False)
        finally:
            torch.random.set_rng_state(generator_state)  # no global side effect
        self.kv_heads, self.head_dim = kv_heads, dim // heads
        self.eval()

    def kv_layout(self, page_size: int) -> KVLayout:
        """The KV geometry this model writes (float32, so cached and fresh logits match)."""
        return KVLayout(
            num_layers=len(self.blocks),
            num_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            dtype="float32",
            page_size=page_size,
        )

    @torch.inference_mode()
    def forward_cached(
        self,
        tokens: torch.Tensor,
        cached_slots: torch.Tensor,
        new_slots: torch.Tensor,
        pool: KVPool,
    ) -> torch.Tensor:
        """Logits of ``tokens`` (the uncached suffix), reading the prefix's K and V from
        ``cached_slots`` and writing the suffix's to ``new_slots``."""
        if tokens.numel() != new_slots.numel():
            raise ValueError(f"{tokens.numel()} new tokens but {new_slots.numel()} new slots")
        start = cached_slots.numel()
        positions = torch.arange(start, start + tokens.numel())
        slots = torch.cat([cached_slots, new_slots])
        h = self.embed(tokens)
        for index, block in enumerate(self.blocks):
            assert isinstance(block, _Layer)
            k, v = block.project_kv(h, positions)
            pool.set_kv_buffer(index, new_slots, k, v)
            keys = pool.get_key_buffer(index)[slots]
            values = pool.get_value_buffer(index)[slots]
            h = block.attend(h, positions, keys, values)
        logits: torch.Tensor = self.head(self.norm(h))
        return logits

    @torch.inference_mode()
    def forward_full(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of every token of ``tokens``, computed from scratch with no cache."""
        positions = torch.arange(tokens.numel())
        h = self.embed(tokens)
        for block in self.blocks:
            assert isinstance(block, _Layer)
            k, v = block.project_kv(h, positions)
            h = block.attend(h, positions, k, v)
        logits: torch.Tensor = self.head(self.norm(h))
        return logits
