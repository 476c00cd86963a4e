"""The JAX model sharded over 8 host devices (unmask.jax.sharding) gives the tokens of one
device. Runs in a subprocess: the device count is fixed when JAX starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax", reason="the jax extra is not installed (pip install '.[jax]')")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "jax_sharding_worker.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_weights_are_split_over_eight_devices(results):
    assert results["devices"] == 8
    assert results["q_proj_spec"] == ["model", None] and results["q_proj_devices"] == 8
    assert results["lm_head_shape"] == [64, 64]  # 61 ids padded to a multiple of 8
    # each expert's hidden units: the columns of gate [E, d, f], the rows of down [E, f, d];
    # the shared expert as the dense MLP; the router whole on every device
    assert results["moe_specs"] == {"experts_gate": [None, None, "model"], "experts_down": [None, "model", None],
                                    "shared_up": ["model", None], "shared_down": [None, "model"], "router": []}


@pytest.mark.parametrize("case", ["greedy", "temperature-1", "threshold-margin-cfg", "block-causal-dual",
                                  "block-causal-prefix", "llada2-moe-dual"])
def test_sharded_generate_equals_one_device(results, case):
    tokens = results[case]
    assert tokens["sharded"] == tokens["single"] == tokens["torch"]


def test_sharded_sample_is_bit_exact(results):
    sharded, single = results["sample"]["sharded"], results["sample"]["single"]
    assert sharded == single  # tokens and float32 confidences, bit for bit (same kernel per row)
    assert sum(t != -1 for row in single[0] for t in row) == 3  # only the selected rows were sampled


def test_heads_that_do_not_split_raise(results):
    assert results["error"] == "config.n_heads=4 must be a multiple of the number of devices (8)"
