"""The tier transitions: backup, load, write-back, prefetch, release, and rank consensus."""
