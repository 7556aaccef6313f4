"""Benchmarks (`make bench`): side-by-side ratios measured in one run; never part of the test suite."""
