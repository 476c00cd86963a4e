"""Microbenchmark, a mixture's routed experts: unmask.ops.moe_swiglu beside torch's
products one expert at a time, at a small MoE's and LLaDA2.0-mini's shapes, in GB/s of
the chosen experts' weights and the fraction of measured read bandwidth.

    python bench/moe.py [--device cpu] [--out FILE] [--no-save]
"""

import torch

from _common import parse, report
from unmask.benchmarks import harness, suites

if __name__ == "__main__":
    args = parse(__doc__)
    device = torch.device(args.device)
    peak = harness.read_bandwidth(device)
    rows = suites.bench_moe(device, peak)
    report(args, rows, {"read_bandwidth_gbps": peak})
