"""Microbenchmark, sample: logits [N, V] -> token and confidence, in GB/s and fraction of measured read bandwidth.

    python bench/sampling.py [--device cpu|cuda] [--out FILE] [--no-save]
"""

import torch

from _common import parse, report
from unmask.benchmarks import suites

if __name__ == "__main__":
    args = parse(__doc__)
    rows, peaks = suites.full_sample(torch.device(args.device))
    report(args, rows, peaks)
