"""A scheduler loop in SGLang's style, on the cache's lower-level API (no sessions).

Each step admits waiting requests while L1 has room: match the prefix in the radix tree, lock
it, load its host part back to L1, reserve device slots for the rest. Then it runs the model on
the admitted batch, inserts the new KV into the tree (freeing slots another request cached
first), schedules backups per the write policy, and unlocks. Requests that do not fit wait for
the next step, as a serving framework's scheduler would make them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from hicache_async import HiCache
from hicache_async.demo.model import TinyCausalLM
from hicache_async.radix import RadixKey, TreeNode


@dataclass
class Request:
    tokens: torch.Tensor
    cached: int = 0
    logits: torch.Tensor | None = None


@dataclass
class _Admitted:
    request: Request
    key: RadixKey
    locked: TreeNode  # device-locked: the matched (and loaded) prefix
    prefix_slots: torch.Tensor
    new_slots: torch.Tensor


class Scheduler:
    """Batches prefill requests through one cache, one step at a time."""

    def __init__(self, cache: HiCache, model: TinyCausalLM, *, max_batch: int = 8) -> None:
        self.cache = cache
        self.model = model
        self.max_batch = max_batch
        self.waiting: deque[Request] = deque()
        self.done: list[Request] = []

    def add(self, tokens: torch.Tensor) -> Request:
        request = Request(tokens)
        self.waiting.append(request)
        return request

    async def _admit(self, request: Request) -> _Admitted | None:
        cache, tree, size = self.cache, self.cache.tree, self.cache.page_size
        key = RadixKey(request.tokens)
        match = tree.match_prefix(key)
        tree.lock(match.last_device_node)
        tree.lock_host(match.last_host_node)
        try:
            prefix, locked = match.device_indices, match.last_device_node
            if cache.loader is not None and match.host_hit_length:
                loaded = await cache.loader.load(match)  # L2 -> L1, all or nothing
                if loaded.loaded_tokens:
                    tree.lock(loaded.last_node)
                    tree.unlock(match.last_device_node)
                    prefix, locked = loaded.device_indices, loaded.last_node
            # The model computes at least the last token (its logits are the output).
            usable = min(prefix.numel(), (request.tokens.numel() - 1) // size * size)
            pages = -(-(request.tokens.numel() - usable) // size)
            slots = cache.device_tier.reserve(pages)
            if slots is None:  # no room this step: release and wait
                tree.unlock(locked)
                return None
            return _Admitted(request, key, locked, prefix[:usable], slots)
        finally:
            tree.unlock_host(match.last_host_node)

    async def step(self) -> int:
        """Admit, run and commit one batch; returns how many requests finished."""
        batch: list[_Admitted] = []
        while self.waiting and len(batch) < self.max_batch:
            admitted = await self._admit(self.waiting[0])
            if admitted is None:
                break
            batch.append(admitted)
            self.waiting.popleft()
        for item in batch:  # the "forward pass" of the batch, request by request here
            tokens, start = item.request.tokens, item.prefix_slots.numel()
            new = item.new_slots[: tokens.numel() - start]
            item.request.logits = self.model.forward_cached(
                tokens[start:], item.prefix_slots, new, self.cache.device_pool
            )
            item.request.cached = start
        for item in batch:
            self._commit(item)
        self.done.extend(item.request for item in batch)
        return len(batch)

    def _commit(self, item: _Admitted) -> None:
        cache, tree, size = self.cache, self.cache.tree, self.cache.page_size
        tokens = item.request.tokens
        start = item.prefix_slots.numel()
        slots = torch.cat([item.prefix_slots, item.new_slots[: tokens.numel() - start]])
        aligned = tokens.numel() // size * size
        key = RadixKey(tokens[:aligned])
        present = tree.insert(key, slots[:aligned])
        # Slots the tree did not take: those another request cached first, and the tail.
        taken = item.new_slots[max(0, present - start) : aligned - start]
        leftover = item.new_slots[~torch.isin(item.new_slots, taken)]
        cache.device_tier.free(leftover)
        cache.after_insert(key, aligned - present)  # KV events, and backups per write policy
        tree.unlock(item.locked)

    async def run_until_idle(self) -> None:
        while self.waiting:
            if not await self.step():
                await self.cache.drain()  # wait for pinning backups to free L1
