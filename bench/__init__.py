"""Benchmarks of the wrappers and the chain (``python -m bench``)."""
