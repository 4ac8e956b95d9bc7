"""Benchmarks run by ``robustcaps bench``: figures to compare as ratios, never asserted."""
