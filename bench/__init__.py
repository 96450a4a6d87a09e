"""Benchmarks: each module measures its candidates side by side in one run (see docs/benchmarks.md)."""
