"""Moving KV between L1 and L2: the event poller and the transfer engines."""

from hicache_async.transfer.base import LoadTicket, TransferEngine, TransferStats
from hicache_async.transfer.cpu import CpuTransferEngine
from hicache_async.transfer.cuda import CudaLoadTicket, CudaTransferEngine
from hicache_async.transfer.factory import make_transfer_engine
from hicache_async.transfer.poller import Completion, EventPoller, is_complete

__all__ = [
    "Completion",
    "CpuTransferEngine",
    "CudaLoadTicket",
    "CudaTransferEngine",
    "EventPoller",
    "LoadTicket",
    "TransferEngine",
    "TransferStats",
    "is_complete",
    "make_transfer_engine",
]
