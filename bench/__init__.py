"""Benchmarks (synthetic CT bursts replayed against the engine and its rivals).

The harness is its own issue; until it lands this package is empty on purpose.
"""
