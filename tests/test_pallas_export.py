"""The Pallas kernels lower for both accelerator families from a CPU-only machine, and the
GPU variant computes what the TPU variant does.

jax.export with platforms=["tpu"] runs the Mosaic lowering and platforms=["cuda"] the
Triton one, without the hardware: a TPU-only compiler param on the GPU path, an op
Mosaic does not lower ("Unimplemented primitive in Pallas TPU lowering") or a
non-power-of-two Triton load fails here. What only the device compiler checks (Mosaic
layouts, VMEM, Triton register pressure) needs the compiled class of tests/test_jax.py
on an accelerator.

The GPU variant has its own grid for sample (no sequential grid axis on GPU) and pads
commit's rows to a power of two, so it reruns the interpret-mode checks of
tests/test_jax.py with that variant forced.
"""

from functools import partial

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install 'unmask[jax]')")
import jax.numpy as jnp  # noqa: E402
from jax.extend import core as jax_core  # noqa: E402

import unmask.jax as uj  # noqa: E402
from unmask.jax import reference as jnp_reference  # noqa: E402
from unmask.pallas import attention as attention_kernel  # noqa: E402
from unmask.pallas import commit as commit_kernel  # noqa: E402
from unmask.pallas import sample as sample_kernel  # noqa: E402
from tests import test_jax  # noqa: E402
from tests.helpers import JAX_CONF_RTOL, check_attention_against_reference, random_inputs  # noqa: E402

# The custom call each platform's variant becomes: the export must contain it (and so
# not, say, an interpreter lowering or the other platform's kernel).
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
# Triton kernels are serialized as Triton IR, which JAX does not promise to load in a
# later version, so export refuses them unless told; Mosaic's call is on the allowlist.
DISABLED_CHECKS = {"tpu": [], "cuda": [jax.export.DisabledSafetyCheck.custom_call(CUSTOM_CALL["cuda"])]}
PLATFORMS = ("tpu", "cuda")
S = jax.ShapeDtypeStruct


def export(fn, platform, *args):
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=DISABLED_CHECKS[platform])(*args)
    assert CUSTOM_CALL[platform] in exported.mlir_module(), f"no {CUSTOM_CALL[platform]} in the {platform} export"
    return exported


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 80])  # 80: Triton takes it padded to 128
@pytest.mark.parametrize("masks", ["block", "padded"])
def test_attention_exports(platform, dtype, head_dim, masks):
    batch, q_len, k_len = 2, 1000, 1023  # odd lengths: both get padded to the tiles
    args = [S((batch, q_len, 8, head_dim), dtype), S((batch, k_len, 2, head_dim), dtype),
            S((batch, k_len, 2, head_dim), dtype)]
    if masks == "block":
        fn = partial(uj.attention, block_size=32, q_offset=0, interpret=False)
    else:
        args.append(S((batch, k_len), jnp.bool_))
        fn = lambda q, k, v, key_valid: uj.attention(q, k, v, key_valid=key_valid, interpret=False)  # noqa: E731
    export(fn, platform, *args)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_attention_exports_with_a_traced_q_offset(platform):
    # A cached block-causal step's window of queries at a traced place in the canvas: one
    # lowering serves every block (the block ends are data, not a static argument).
    q, k = S((2, 48, 8, 64), jnp.bfloat16), S((2, 300, 2, 64), jnp.bfloat16)
    fn = lambda q, k, v, offset: uj.attention(q, k, v, block_size=32, q_offset=offset, interpret=False)  # noqa: E731
    export(fn, platform, q, k, k, S((), jnp.int32))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_attention_exports_at_8k(platform):
    q = S((1, 8192, 8, 128), jnp.bfloat16)
    export(partial(uj.attention, block_size=32, interpret=False), platform, q, q, q)


def _dot_operand_dtypes(jaxpr):
    """(lhs dtype, rhs dtype, preferred dtype) of every dot_general in jaxpr and its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((*(str(var.aval.dtype) for var in eqn.invars), str(eqn.params["preferred_element_type"])))
        for sub in jax_core.jaxprs_in_params(eqn.params):
            found += _dot_operand_dtypes(sub)
    return found


def test_attention_products_take_bf16_with_float32_accumulation():
    """Every matrix product of the kernel body runs on bf16 operands (the MXU / tensor-core
    rate), accumulating in float32: a float32 cast before a dot would show here. Q K^T and
    P V, and in the branch for a non-finite V that some rows of a tile do not see, P V and
    three 0/1 counts."""
    q = jnp.zeros((1, 4, 128, 128), jnp.bfloat16)
    valid = jnp.ones((1, 1, 128), jnp.int32)
    ends = attention_kernel.block_ends(0, 128, 128, 32)
    jaxpr = jax.make_jaxpr(partial(attention_kernel.attention_pallas, scale=0.1, tile_q=128, tile_k=128,
                                   interpret=True, variant="tpu"))(q, q, q, valid, ends)
    assert _dot_operand_dtypes(jaxpr.jaxpr) == [("bfloat16", "bfloat16", "float32")] * 6


def test_attention_vmem_against_tpu_defaults():
    """The numbers the kernel's comments give: K and V of an 8k x 128 head fit the 16 MiB
    v5e scoped default in bf16, not in float32 (the kernel raises its limit for that)."""
    mib = 1 << 20
    bf16 = attention_kernel.vmem_bytes(8192, 128, 2, 128, 128)
    f32 = attention_kernel.vmem_bytes(8192, 128, 4, 128, 128)
    assert 8 * mib < bf16 < 12 * mib, bf16 / mib
    assert 16 * mib < f32 < 20 * mib, f32 / mib


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("vocab", [32000, 126464])
@pytest.mark.parametrize("kwargs", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=50, top_p=0.9, confidence="margin"),
    dict(top_p=0.95, confidence="entropy"),
    dict(temperature=1.0, confidence="random", banned=[0, 5]),
])
@pytest.mark.parametrize("offsets", ["one", "per-row"])
def test_sample_exports(platform, vocab, kwargs, offsets):
    # offset traced: one for every row, or one per row of logits (each row's own step, as
    # the step loop passes it)
    fn = lambda logits, offset: uj.sample(logits, seed=7, offset=offset, interpret=False, **kwargs)  # noqa: E731
    export(fn, platform, S((3, 32, vocab), jnp.bfloat16), S(() if offsets == "one" else (3, 32), jnp.int32))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("length", [32, 256, 1000])
@pytest.mark.parametrize("mode", ["k", "threshold", "factor"])
def test_commit_exports(platform, length, mode):
    rows = (5, length)
    args = [S(rows, jnp.int32), S(rows, jnp.int32), S(rows, jnp.float32), S(rows, jnp.bool_)]
    if mode == "k":
        fn = lambda x, tokens, conf, eligible, k: uj.commit(x, tokens, conf, eligible, k=k,  # noqa: E731
                                                            interpret=False)
        args.append(S((5,), jnp.int32))
    else:
        fn = partial(uj.commit, interpret=False, **{mode: 0.9 if mode == "threshold" else 1.0})
    export(fn, platform, *args)


def force_variant(monkeypatch, variant):
    """Make unmask.jax.kernels call every kernel with this variant (interpret mode alone
    takes "tpu"): the public functions have no variant argument."""
    for module, name in ((attention_kernel, "attention_pallas"), (sample_kernel, "sample_pallas"),
                         (commit_kernel, "commit_pallas")):
        monkeypatch.setattr(module, name, partial(getattr(module, name), variant=variant))


@pytest.fixture(params=["tpu", "gpu"])
def variant(request, monkeypatch):
    force_variant(monkeypatch, request.param)
    return request.param


class TestGpuVariantInterpret(test_jax.TestPallasCompiled):
    """Every interpret-mode check of tests/test_jax.py, on the GPU variant."""

    INTERPRET = True

    @pytest.fixture(autouse=True)
    def _gpu_variant(self, monkeypatch):
        force_variant(monkeypatch, "gpu")


def _attention_backend(call, out):
    """tests.helpers' backend contract (an AttentionCall in, out written) over unmask.jax."""
    def to_jax(t):
        return None if t is None else jnp.asarray(t.float().numpy() if t.is_floating_point() else t.numpy())

    dtype = {torch.bfloat16: jnp.bfloat16, torch.float32: jnp.float32}[call.q.dtype]
    result = uj.attention(*(to_jax(t).astype(dtype) for t in (call.q, call.k, call.v)), kv_len=to_jax(call.kv_len),
                          key_valid=to_jax(call.key_valid), block_size=call.block_size, q_offset=call.q_offset,
                          scale=call.scale, interpret=True)
    out.copy_(torch.tensor(np.asarray(result.astype(jnp.float32))).to(out.dtype))


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.bfloat16, 64), (torch.float32, 128)])
def test_attention_dtypes_in_both_variants(variant, dtype, head_dim):
    """bf16 products with float32 accumulation stay within twice the error of attention
    computed in bf16 (tests.helpers), at D 128 with the block-causal and padding masks."""
    q, k, v, gen = random_inputs(2, 70, 150, 4, 2, head_dim, dtype, seed=head_dim)
    check_attention_against_reference(q, k, v, backend=_attention_backend, block_size=32, q_offset=16,
                                      kv_len=torch.tensor([150, 97]),
                                      key_valid=torch.rand(2, 150, generator=gen) > 0.2)


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0, top_k=50, seed=3), dict(top_p=0.9, confidence="entropy")])
def test_sample_real_vocabulary_in_both_variants(variant, kwargs):
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 126464)).astype(np.float32) * 4)
    tokens, conf = uj.sample(logits, interpret=True, **kwargs)
    ref_tokens, ref_conf = jnp_reference.sample(logits, **kwargs)
    assert np.array_equal(np.asarray(tokens), np.asarray(ref_tokens))
    np.testing.assert_allclose(np.asarray(conf), np.asarray(ref_conf), rtol=JAX_CONF_RTOL, atol=1e-6)


def test_sample_rejects_tiles_off_the_lane_width():
    with pytest.raises(ValueError, match="tile_v=200 must be a positive multiple of 128"):
        uj.sample(jnp.zeros((2, 1000), jnp.float32), tile_v=200, interpret=True)
