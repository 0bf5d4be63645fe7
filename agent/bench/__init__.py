"""Benchmarks: figures the README and closing notes quote, produced by `throttllem bench`."""
