"""The file L3 backend (``file``): hicache-async's embedded default, needs no server."""

from hicache_file._backend import FileStorage
from hicache_file._options import FileOptions

__all__ = ["FileOptions", "FileStorage"]
