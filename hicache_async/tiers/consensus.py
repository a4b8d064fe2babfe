"""Agreement between tensor-parallel ranks: a MIN all-reduce, awaited without blocking the loop.

Each tensor-parallel rank runs its own cache. A prefetch or an L3 write counts only when every
rank has it, so ranks agree on counts through a MIN all-reduce (SGLang does the same). The
collective is issued with ``async_op=True`` and its work handle awaited by polling, so the event
loop keeps serving while the ranks exchange.

Collectives must be issued by every rank in the same order, even by a rank that has nothing to
report (SGLang deadlocked when one rank skipped a round). :class:`RankConsensus` serialises its
rounds in call order (one at a time) and numbers them, so two rounds can never interleave; the
caller must still reach its rounds in the same order on every rank, e.g. from one scheduler
step, passing zeros when idle.

Rounds pair up by position only, so a rank that reaches them in another order (concurrent
requests whose awaits finished in another order there) would take the minimum of unrelated
counts. :meth:`RankConsensus.agree_round` carries a tag (which request, which step) through the
reduction, as a MIN of the tag and of its negation: when the two differ, the ranks were not at
the same round, every rank sees it, and every rank returns ``None`` (the callers then use
nothing, the same nothing everywhere). An operation that stops at its first unpaired round stops
there on every rank, so all ranks still issue the same number of rounds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import torch
import torch.distributed as dist

from hicache_async.errors import ConfigError, HiCacheError

__all__ = [
    "ROUND_VALUES",
    "AgreementError",
    "RankConsensus",
    "poll_until_done",
    "round_tag",
    "wait_in_thread",
]


class AgreementError(HiCacheError):
    """A collective of the ranks' agreement failed (a peer went away, the group timed out):
    its result would be this rank's own values, so nothing may be used from it."""


ROUND_VALUES = 3  # counts one tagged round carries: every round has the same shape on the wire
_TAG_MASK = (1 << 61) - 1


def round_tag(fingerprint: int, ordinal: int, step: int) -> int:
    """A round's tag: the request's fingerprint (e.g. a CRC of its key), its ordinal (sessions
    are created in the same order on every rank) and the step within it (< 4); non-negative
    and below 2**61, so its negation fits the int64 reduction too."""
    return ((fingerprint << 29) ^ (ordinal << 2) ^ step) & _TAG_MASK


async def poll_until_done(work: dist.Work) -> None:
    """Await ``work`` by polling with back-off (a fallback when no event poller is shared)."""
    delay = 0.0
    while not work.is_completed():
        await anyio.sleep(delay)
        delay = min(max(delay * 2, 5e-5), 1e-3)
    work.wait()  # completed: returns at once, and raises if the collective failed


async def wait_in_thread(work: dist.Work) -> None:
    """Await ``work`` from a worker thread blocked in ``work.wait()``: for a CPU (gloo) group,
    ~3x less latency than polling (``benchmarks/bench_distributed.py``: p50 ~0.5 ms against
    ~1.5 ms). Not for NCCL work, whose ``wait()`` returns before the collective is done."""
    await anyio.to_thread.run_sync(work.wait)


class RankConsensus:
    """MIN all-reduce rounds over a process group (gloo on CPU, NCCL on GPU).

    ``waiter`` awaits a work handle; pass the cache's event poller's ``wait`` so one task polls
    everything, or leave the default polling loop.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        waiter: Callable[[dist.Work], Awaitable[None]] = poll_until_done,
        device: torch.device | str = "cpu",
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError(
                "RankConsensus needs torch.distributed initialised first "
                "(torch.distributed.init_process_group)"
            )
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._waiter = waiter
        self._device = torch.device(device)
        self._lock = anyio.Lock()  # FIFO: rounds go out in call order
        self.rounds = 0
        self.unpaired = 0  # tagged rounds the ranks reached in different orders

    async def agree_min(self, values: Sequence[int]) -> list[int]:
        """The element-wise minimum of ``values`` over all ranks (same length on every rank)."""
        # A round, once asked for, goes out and completes even if the caller is cancelled:
        # a rank that skipped it would pair every later round with the wrong one. So the
        # queueing for the lock and the wait are shielded; the caller sees its cancellation
        # at its next checkpoint.
        with anyio.CancelScope(shield=True):
            async with self._lock:
                tensor = torch.tensor(list(values), dtype=torch.int64, device=self._device)
                if tensor.numel() == 0:
                    tensor = torch.zeros(1, dtype=torch.int64, device=self._device)
                work = dist.all_reduce(
                    tensor, op=dist.ReduceOp.MIN, group=self.group, async_op=True
                )
                assert work is not None
                try:
                    await self._waiter(work)
                    work.wait()  # completed: returns at once, or raises what the collective hit
                except Exception as exc:  # a peer went away, a timeout: the values are ours
                    raise AgreementError(f"tensor-parallel agreement failed: {exc}") from exc
                self.rounds += 1
        return tensor.tolist()[: len(values)]

    async def agree(self, value: int) -> int:
        """The minimum of one count over all ranks."""
        return (await self.agree_min([value]))[0]

    async def agree_round(self, tag: int, values: Sequence[int]) -> list[int] | None:
        """The element-wise minimum of ``values`` (at most :data:`ROUND_VALUES`) over all ranks,
        or ``None`` on every rank when not all of them passed the same ``tag`` (they reached
        this round from different requests or steps). Use one shape per group: untagged
        :meth:`agree_min` rounds of another length must not share the group."""
        if not 0 <= tag <= _TAG_MASK or len(values) > ROUND_VALUES:
            raise ValueError(f"a round takes a tag in [0, 2**61) and <= {ROUND_VALUES} values")
        padded = [*values, *[0] * (ROUND_VALUES - len(values)), tag, -tag]
        out = await self.agree_min(padded)
        if out[ROUND_VALUES] != -out[ROUND_VALUES + 1]:  # min(tag) != max(tag)
            self.unpaired += 1
            return None
        return out[: len(values)]
