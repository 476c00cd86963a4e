"""Microbenchmark, attention: masked bidirectional attention in GFLOP/s, beside torch SDPA.

On CUDA (bf16, D = 128, H = 32): every torch SDPA backend that takes the case and
FlexAttention, as a fraction of a bf16 matmul measured in the same run; plain shapes of
1k-8k tokens, block-causal (32) with padding, and short query blocks (32, 128) against
4096 cached keys, those also in GB/s of K and V reads against device copy bandwidth.
On the CPU (float32, [1, 1024, 32, 128], no mask and block-causal 32 with padding):
torch SDPA, FlexAttention where it compiles, as a fraction of a float32 matmul measured
in the same run.

With --sweep (CPU): the shapes decoding runs (unmask.benchmarks.attention_sweep): head
dims 16-128, queries 1-1024 against keys 32-4096, padding, block-causal and cached-block
cases, float32 and bfloat16, each beside SDPA with the equivalent mask.

    python bench/attention.py [--device cpu|cuda] [--sweep [--quick]] [--out FILE] [--no-save]
"""

import torch

from _common import parse, report
from unmask.benchmarks import attention_sweep, suites


def options(parser):
    parser.add_argument("--sweep", action="store_true", help="the CPU shape sweep")
    parser.add_argument("--quick", action="store_true", help="with --sweep: three cases")


if __name__ == "__main__":
    args = parse(__doc__, options)
    if args.sweep:
        rows, peaks = attention_sweep.sweep(quick=args.quick)
    else:
        rows, peaks = suites.full_attention(torch.device(args.device))
    report(args, rows, peaks)
