"""Microbenchmark, commit: confidence-based unmasking of a canvas, beside the eager reference.

    python bench/commit.py [--device cpu|cuda] [--out FILE] [--no-save]
"""

import torch

from _common import parse, report
from unmask.benchmarks import suites

if __name__ == "__main__":
    args = parse(__doc__)
    rows, peaks = suites.full_commit(torch.device(args.device))
    report(args, rows, peaks)
