"""The Redis L3 backend (``redis``): Redis or Redis Cluster through ``redis.asyncio``.

The client is asyncio-only: the backend runs on the event loop, with no worker threads.
"""

from hicache_redis._backend import RedisStorage
from hicache_redis._options import RedisOptions

__all__ = ["RedisOptions", "RedisStorage"]
