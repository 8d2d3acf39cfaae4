"""Reproducible benchmarks: each compares against a baseline in the same run and writes JSON to bench/results/."""
