"""Benchmarks: `python -m bench.train`, `python -m bench.relay`. Each prints a table and writes JSON.

They measure; they assert nothing (speed goals live here, not in the tests). Run them on a quiet
machine: this project's machines are shared, so compare ratios from one run, not absolute times.
"""
