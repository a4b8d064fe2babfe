"""The Mooncake Store L3 backend (``mooncake``): a distributed store shared between servers.

Needs Mooncake's store client (``pip install mooncake-transfer-engine``, or
``mooncake-transfer-engine-non-cuda`` without CUDA; ``libibverbs1`` for its TCP transport),
imported when a backend is created, so the registry lists ``mooncake`` without it.
"""

from hicache_mooncake._backend import MooncakeStorage, describe_error
from hicache_mooncake._options import MooncakeOptions

__all__ = ["MooncakeOptions", "MooncakeStorage", "describe_error"]
