"""Microbenchmarks in roofline units (GB/s, GFLOP/s and fractions of measured peaks).

Lives inside the package so `unmask bench` works from an installed wheel; the
scripts in the repository's bench/ folder are thin entry points over it.
"""
