"""L1 and L2 memory: paged allocators and the KV pools that storage and transfers read."""

from hicache_async.memory.allocator import PagedAllocator
from hicache_async.memory.device_pool import DeviceKVPool
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.memory.slots import pages_to_slots, slots_to_pages

__all__ = ["DeviceKVPool", "HostKVPool", "PagedAllocator", "pages_to_slots", "slots_to_pages"]
