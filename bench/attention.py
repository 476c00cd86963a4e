"""Microbenchmark, attention: masked bidirectional attention in GFLOP/s, beside torch SDPA.

    python bench/attention.py [--device cpu|cuda] [--out FILE] [--no-save]
"""

import torch

from _common import parse, report
from unmask.benchmarks import suites

if __name__ == "__main__":
    args = parse(__doc__)
    rows, peaks = suites.full_attention(torch.device(args.device))
    report(args, rows, peaks)
