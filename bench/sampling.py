"""Microbenchmark, sample: logits [N, V] -> token and confidence, in GB/s and fraction of measured read bandwidth.

    python bench/sampling.py [--device cpu|cuda] [--out FILE] [--no-save] [--shapes 256x126464 ...]
"""

import torch

from _common import parse, report
from unmask.benchmarks import suites

if __name__ == "__main__":
    args = parse(__doc__, extra=lambda p: p.add_argument("--shapes", nargs="+", help="NxV, e.g. 256x126464"))
    shapes = [tuple(int(n) for n in text.split("x")) for text in args.shapes] if args.shapes else None
    rows, peaks = suites.full_sample(torch.device(args.device), shapes)
    report(args, rows, peaks)
