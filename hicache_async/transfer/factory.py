"""Pick the transfer engine for a pair of pools, by the device pool's device.

``io_backend`` (from :class:`~hicache_async.config.HiCacheConfig`): ``direct`` is torch index
ops and strided ``copy_`` calls (coalesced runs), the one implementation today. ``kernel``
names fused gather/scatter kernels (SGLang's ``transfer_kv_*``); none ships yet, so it maps to
``direct`` on both devices. ``auto`` picks the best available: ``direct``.
"""

from __future__ import annotations

from typing import Any

from hicache_async.config import IOBackend
from hicache_async.memory.device_pool import DeviceKVPool
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.transfer.base import TransferEngine
from hicache_async.transfer.cpu import CpuTransferEngine
from hicache_async.transfer.cuda import CudaTransferEngine
from hicache_async.transfer.poller import EventPoller

__all__ = ["make_transfer_engine", "resolve_io_backend"]


def resolve_io_backend(io_backend: IOBackend | str) -> IOBackend:
    """The backend that really runs for ``io_backend`` (today always ``direct``)."""
    IOBackend(io_backend)  # a clear ValueError for an unknown name
    return IOBackend.DIRECT


def make_transfer_engine(
    device_pool: DeviceKVPool,
    host_pool: HostKVPool,
    poller: EventPoller,
    *,
    io_backend: IOBackend | str = IOBackend.AUTO,
    **options: Any,
) -> TransferEngine:
    """A :class:`CudaTransferEngine` for a CUDA device pool, else a :class:`CpuTransferEngine`.

    ``options`` go to the engine's constructor (``threads``, ``chunk_bytes`` for CPU).
    """
    resolve_io_backend(io_backend)
    if device_pool.device.type == "cuda":
        return CudaTransferEngine(device_pool, host_pool, poller, **options)
    return CpuTransferEngine(device_pool, host_pool, **options)
