"""Test helpers that ship with the package: the storage conformance kit and fault wrappers."""
