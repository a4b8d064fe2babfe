"""The demo: a small transformer served through the cache (the README's first command)."""
