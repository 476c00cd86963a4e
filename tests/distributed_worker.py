"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): the tiny
models and decoding cases, generated tensor-parallel; rank 0 writes the tokens as JSON.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT.json
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import unmask  # noqa: E402
from unmask import distributed  # noqa: E402
from unmask.models.transformer import local_share  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

PROMPTS = [[5, 9, 3, 7, 1], [11, 2], [4, 4, 8]]  # ragged: left-padded inside generate
MOE_MODEL = dict(model_type="llada2", qk_norm=True, attention_head_dim=8, block_size=4, norm_std=0.3,
                 moe=unmask.MoeConfig(n_experts=8, experts_per_token=3, expert_hidden_size=12, n_shared_experts=1,
                                      n_groups=4, top_groups=2, routed_scaling=2.5, dense_layers=1))

# (name, model overrides, generate arguments). The tiny model's 4 query heads, 2 key/value
# heads (GQA), 48 MLP units and 61 vocabulary ids (an uneven 31 + 30 split) all shard over 2 ranks.
CASES = [
    ("greedy-steps", {}, dict(gen_length=16, block_length=8, steps=16)),
    ("temperature-1", {}, dict(gen_length=16, block_length=8, steps=8, temperature=1.0, seed=7)),
    ("threshold-margin", {}, dict(gen_length=16, block_length=4, threshold=0.3, remasking="margin")),
    ("factor-entropy-cfg", {}, dict(gen_length=8, block_length=8, factor=1.0, remasking="entropy", cfg_scale=0.5)),
    ("random-remasking", {}, dict(gen_length=8, block_length=4, steps=4, temperature=0.5, remasking="random", seed=3)),
    ("top-k-top-p", {}, dict(gen_length=8, block_length=8, steps=8, temperature=1.0, top_k=7, top_p=0.9, seed=1)),
    ("dual-cache", {}, dict(gen_length=16, block_length=8, steps=16, cache="dual")),
    ("speculate-threshold", {}, dict(gen_length=16, block_length=8, threshold=0.5, speculate=2, temperature=1.0,
                                     seed=5)),
    # SDAR's Qwen3 layout: q/k norms (whole on each rank), a head dim apart from d / heads
    ("sdar-qk-norm", dict(model_type="sdar", qk_norm=True, attention_head_dim=16, block_size=4, norm_std=0.3),
     dict(gen_length=8, block_length=4, steps=8, cache="dual")),
    # LLaDA 2.0's mixture of experts after a dense layer: 8 experts of 12 hidden units (6 a
    # rank), 3 a token within 2 of 4 groups, a shared expert (and none)
    ("llada2-moe", MOE_MODEL, dict(gen_length=8, block_length=4, steps=8, cache="dual")),
    ("llada2-moe-unshared", {**MOE_MODEL, "moe": dataclasses.replace(MOE_MODEL["moe"], n_shared_experts=0)},
     dict(gen_length=8, block_length=4, threshold=0.5)),
    ("qkv-bias-tied-shifted", dict(include_qkv_bias=True, weight_tying=True, model_type="dream"),
     dict(gen_length=8, block_length=8, steps=8, temperature=1.0, seed=2)),  # last: its shard is read below
]


def model_for(overrides: dict) -> unmask.DiffusionTransformer:
    return tiny_model(seed=4, **overrides)


def run_case(model, arguments: dict) -> list[list[int]]:
    return unmask.generate(model, PROMPTS, **arguments).tokens.tolist()


def main(out_path: str) -> None:
    mesh = distributed.init("cpu")
    results = {}
    for name, overrides, arguments in CASES:
        model = distributed.tensor_parallel(model_for(overrides), mesh)
        results[name] = run_case(model, arguments)
        if name == "llada2-moe":  # rank 0's share of each expert and of the shared expert; its logits
            moe = model.layers[1].moe
            results["moe_shard"] = {"local_gate": list(local_share(moe.expert_gate).shape),
                                    "local_down": list(local_share(moe.expert_down).shape),
                                    "local_shared_up": list(local_share(moe.shared.up_proj.weight).shape)}
            ids = torch.tensor([PROMPTS[0] + [60, 60, 60]])
            with torch.no_grad():
                local, whole = model(ids), model_for(overrides)(ids)
            shard = model.vocab_shard
            results["moe_logits_error"] = float((local - whole[..., shard.start:shard.start + shard.size]).abs().max())
            try:
                model.embed.weight.requires_grad_(True)
                model(ids)
                results["moe_gradient"] = None
            except NotImplementedError as error:
                results["moe_gradient"] = str(error)
    # rank 0's share of the sharded head (what the token comparisons cannot tell apart
    # from a model left whole)
    shard = model.vocab_shard
    results["shard"] = {"sizes": list(shard.sizes), "start": shard.start,
                        "local_head_rows": local_share(model.lm_head.weight).shape[0],
                        "local_query_rows": local_share(model.layers[0].q_proj.weight).shape[0]}
    for name, refused in (("error", lambda: distributed.tensor_parallel(model_for(dict(n_heads=4, n_kv_heads=1)),
                                                                         mesh)),
                          ("reversed-mesh", lambda: distributed.tensor_parallel(
                              model_for({}), torch.distributed.device_mesh.DeviceMesh("cpu", [1, 0])))):
        try:
            refused()
            results[name] = None
        except ValueError as error:
            results[name] = str(error)
    if torch.distributed.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
