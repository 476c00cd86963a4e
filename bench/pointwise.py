"""Microbenchmark, the model's pointwise kernels: RMSNorm and rotary embeddings through
unmask.ops, beside the eager torch operations the model ran before them and their
torch.compile, on the bundled and the medium model's step shapes (issue 22).

    python bench/pointwise.py [--device cpu] [--out FILE] [--no-save]
"""

import torch

from _common import parse, report
from unmask.benchmarks import harness, suites

if __name__ == "__main__":
    args = parse(__doc__)
    device = torch.device(args.device)
    rows = suites.bench_pointwise(device)
    report(args, rows, {"copy_bandwidth_gbps": harness.copy_bandwidth(device)})
