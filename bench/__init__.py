"""Benchmarks: `genclip bench engine` and `genclip bench agent` (see docs/benchmarks.md)."""
