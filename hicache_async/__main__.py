"""``python -m hicache_async``: the command line."""

import sys

from hicache_async.cli import main

sys.exit(main())
