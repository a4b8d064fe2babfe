"""The Redis L3 backend (``redis``); placeholder until its module lands."""
