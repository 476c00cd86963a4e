"""Run by tests/test_jax_sharding.py in a fresh process with 8 host devices: the JAX model
sharded over a mesh against one device; prints the comparisons as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/jax_sharding_worker.py
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import unmask  # noqa: E402
import unmask.jax as uj  # noqa: E402
from unmask.jax import sharding  # noqa: E402
from tests.helpers import tiny_model  # noqa: E402

PROMPTS = [[5, 9, 3, 7, 1], [11, 2], [4, 4, 8]]  # ragged: left padding inside generate
CASES = {
    "greedy": dict(gen_length=8, block_length=4, steps=8),
    "temperature-1": dict(gen_length=8, block_length=8, steps=4, temperature=1.0, seed=3),
    "threshold-margin-cfg": dict(gen_length=8, block_length=8, threshold=0.3, remasking="margin", cfg_scale=0.5),
}
# A block-causal model (block_size 4) with caches: each device's attention takes the
# window's start as a traced q_offset, and the ragged rows are rotated to their own grids.
BLOCK_CAUSAL_CASES = {
    "block-causal-dual": dict(gen_length=24, block_length=4, steps=24, cache="dual"),  # canvas 29: window off 0
    "block-causal-prefix": dict(gen_length=12, block_length=6, steps=12, cache="prefix"),
}
# LLaDA 2.0's layout with a mixture after a dense layer: 8 experts of 16 hidden units (2 a
# device), 3 a token within 2 of 4 groups, a shared expert; its dynamic rule.
MOE_CASES = {
    "llada2-moe-dual": dict(gen_length=12, block_length=4, steps=12, threshold=0.5, cache="dual"),
}


def as_list(array) -> list:
    return np.asarray(array).tolist()


def main() -> None:
    results = {"devices": len(jax.devices())}
    # 16 query heads over 8 key/value heads (GQA), 48 MLP units, 61 vocabulary ids (padded to 64).
    torch_model = tiny_model(seed=4, d_model=64, n_heads=16, n_kv_heads=8)
    single = uj.from_torch(torch_model)
    sharded = sharding.shard(single)
    results["q_proj_spec"] = list(sharded.params["layers"][0]["q_proj"].sharding.spec)
    results["q_proj_devices"] = len(sharded.params["layers"][0]["q_proj"].sharding.device_set)
    results["lm_head_shape"] = list(sharded.params["lm_head"].shape)
    # SDAR's Qwen3 layout besides: q/k norms, a head dim (8) apart from d_model / heads (4)
    block_causal = tiny_model(seed=4, d_model=64, n_heads=16, n_kv_heads=8, block_size=4, model_type="sdar",
                              qk_norm=True, attention_head_dim=8, norm_std=0.3)
    moe = unmask.MoeConfig(n_experts=8, experts_per_token=3, expert_hidden_size=16, n_shared_experts=1, n_groups=4,
                           top_groups=2, routed_scaling=2.5, dense_layers=1)
    mixture = tiny_model(seed=4, d_model=64, n_heads=16, n_kv_heads=8, block_size=4, model_type="llada2",
                         qk_norm=True, attention_head_dim=8, norm_std=0.3, moe=moe)
    sharded_mixture = sharding.shard(uj.from_torch(mixture))
    results["moe_specs"] = {name: list(sharded_mixture.params["layers"][1][name].sharding.spec)
                            for name in ("experts_gate", "experts_down", "shared_up", "shared_down", "router")}
    models = {"dense": (torch_model, single, sharded),
              "block-causal": (block_causal, uj.from_torch(block_causal), sharding.shard(uj.from_torch(block_causal))),
              "moe": (mixture, uj.from_torch(mixture), sharded_mixture)}
    for name, arguments in {**CASES, **BLOCK_CAUSAL_CASES, **MOE_CASES}.items():
        group = "block-causal" if name in BLOCK_CAUSAL_CASES else "moe" if name in MOE_CASES else "dense"
        torch_one, single_one, sharded_one = models[group]
        results[name] = {
            "sharded": as_list(uj.generate(sharded_one, PROMPTS, **arguments).tokens),
            "single": as_list(uj.generate(single_one, PROMPTS, **arguments).tokens),
            "torch": unmask.generate(torch_one, PROMPTS, **arguments).tokens.tolist(),
        }
    logits = jax.random.normal(jax.random.key(0), (3, 7, 300)) * 3
    kwargs = dict(temperature=0.8, confidence="entropy", seed=11, offset=5, banned=[299], rows=np.array([0, 4, 20]))
    results["sample"] = {
        "sharded": [as_list(a) for a in sharded.sample_logits(logits, **kwargs)],
        "single": [as_list(a) for a in uj.sample(logits, **kwargs)],
    }
    try:
        sharding.shard(uj.from_torch(tiny_model(seed=4, n_heads=4, n_kv_heads=2)))
        results["error"] = None
    except ValueError as error:
        results["error"] = str(error)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
