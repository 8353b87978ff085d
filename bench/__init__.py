"""Benchmarks: `python -m bench.train`, `bench.relay`, `bench.transfer`. Each prints a table and writes JSON.

They measure; they assert nothing (the speed goals and the current figures are in bench/README.md,
not in the tests). Run them on a quiet machine: this project's machines are shared, so compare
ratios from one run, not absolute times.
"""
