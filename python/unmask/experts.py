"""moe_swiglu by torch's own products, one expert at a time: the backend of unmask.ops.moe_swiglu
where no native kernel takes the call (float16 and float32 on CUDA; a call that needs a
gradient; float64).

Each expert's products run in the activations' dtype, as an nn.Linear would (a bfloat16
model rounds its hidden activations to bfloat16, as LLaDA 2.0's own code does; the CPU
and CUDA kernels keep them float32), and the weighted outputs are summed in float32 in expert
order. The expert counts are read on the host once per call, so a model calling this
is not captured as a CUDA graph."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from unmask import validation
from unmask.validation import MoeCall


def launch(call: MoeCall, out: torch.Tensor | None = None) -> torch.Tensor:
    n_experts, per_token = call.gate.shape[0], call.experts.shape[1]
    wide = torch.float64 if call.x.dtype == torch.float64 else torch.float32
    result = torch.zeros(call.x.shape, dtype=wide, device=call.x.device)
    flat = call.experts.flatten()
    if flat.numel() == 0:  # no tokens
        return result if out is None else out.zero_()
    # The counts and the ids' range in one host read.
    counts_and_range = torch.cat([torch.bincount(flat.clamp(0, n_experts - 1), minlength=n_experts),
                                  flat.min()[None], flat.max()[None]]).tolist()
    counts, (low, high) = counts_and_range[:-2], counts_and_range[-2:]
    validation.check_expert_ids(low, high, n_experts)
    order = flat.argsort(stable=True)
    token_of = order // per_token
    weight_of = call.weights.flatten()[order]
    begin = 0
    for expert, count in enumerate(counts):
        if count:
            rows = token_of[begin:begin + count]
            x = call.x[rows]
            hidden = nn.functional.silu(nn.functional.linear(x, call.gate[expert])) * nn.functional.linear(
                x, call.up[expert])
            y = nn.functional.linear(hidden, call.down[expert])
            result.index_add_(0, rows, y.to(wide) * weight_of[begin:begin + count, None].to(wide))
            begin += count
    if out is None:
        return result
    out.copy_(result)
    return out


@dataclasses.dataclass(frozen=True)
class ExpertsKernel:
    """torch's products as a backend of the kernel table (unmask.dispatch)."""

    kernel: str = "moe_swiglu"
    name: str = "torch-experts"
    launch: Callable = launch

    def supports(self, call: MoeCall) -> str | None:
        return None

    def preferred(self, call: MoeCall) -> str | None:
        """Never over a native kernel that takes the call: which backend runs must not
        depend on how many tokens share it, or a token's bits would (the CPU kernel keeps
        its hidden activations float32, these products round them). With many pairs per
        expert torch's bf16 products are faster on a CPU with bf16 dot products (README,
        Performance): that is a cost taken for the invariance."""
        return None

    def __call__(self, call: MoeCall, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.launch(call, out=out)


EXPERTS = ExpertsKernel()
