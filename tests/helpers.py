"""What several test modules share: tolerances (each with its reason), tiny models,
poisoned kernel runs and the comparisons against the reference."""

from __future__ import annotations

import pytest
import torch

import unmask
from unmask import native, reference, rng, validation

# --------------------------------------------------------------------------- tolerances

# Native sample against the reference: z = (x - max) / conf_temperature is formed in
# float32 (|z| * 2^-24 relative error in each exponent, |z| <= 30 here) and summed in
# float32 chunks; 1e-5 relative covers both.
CONF_RTOL = 1e-5
# Entropy sums p log p in float32: its absolute error is ~2-5e-7 on both CPU and CUDA, so
# a row near zero entropy (one dominant id) needs an absolute tolerance too.
ENTROPY_ATOL = 1e-6
# JAX runs float32 throughout: exp / log rounding on |z| <= 30 plus float32 sums.
JAX_CONF_RTOL = 2e-5
# A value no kernel writes: outputs are filled with it first, so an unwritten element fails.
POISON_TOKEN = 987654321


# --------------------------------------------------------------------------- devices and models


def has_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.device_count() > 0


GPU_SKIP_REASON = "needs a CUDA device"  # the cases that carry it are marked gpu (conftest.py)
requires_gpu = pytest.mark.skipif(not has_gpu(), reason=GPU_SKIP_REASON)
requires_extension = pytest.mark.skipif(not native.available(), reason="unmask._C not built")
requires_cuda_build = pytest.mark.skipif(not native.available() or not native._C.cuda_compiled(),
                                         reason="unmask._C built without CUDA")
requires_interpreter = pytest.mark.skipif(not native.interpreter_available(),
                                          reason="this build has no SIMT interpreter (GCC on x86-64 Linux)")


class CudaRunner:
    """Where a CUDA kernel test runs: on a GPU, or under the SIMT interpreter on CPU tensors."""

    def __init__(self, name: str):
        self.name = name
        self.device = "cuda" if name == "gpu" else "cpu"
        self.interpreted = name == "interpreter"

    def backend(self, kernel: str):
        if self.interpreted:
            return native.interpreted_kernels()[(kernel, "cpu")]
        return native.kernels()[(kernel, "cuda")]

    def sm_count(self) -> int:
        if self.interpreted:
            return native._C.simt_sm_count()
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count

    def synchronize(self) -> None:
        if not self.interpreted:
            torch.cuda.synchronize()


# The interpreter runs the CUDA kernel source on fibers at ~2-4e5 threads per second on one
# core (bench/simt.py): shapes that launch more than ~2e5 threads are GPU-only.
CUDA_RUNNERS = [
    pytest.param("gpu", marks=[requires_gpu, requires_cuda_build]),
    pytest.param("interpreter", marks=requires_interpreter),
]


def tiny_config(**overrides) -> unmask.ModelConfig:
    fields = dict(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
        vocab_size=61, embedding_size=61, mask_token_id=60, eos_token_id=59, rope_theta=10000.0,
    )
    fields.update(overrides)
    return unmask.ModelConfig(**fields)


def tiny_model(seed: int = 0, std: float = 0.3, norm_std: float = 0.0, **overrides) -> unmask.DiffusionTransformer:
    """A random model with weights large enough that its logits vary from position to position.
    norm_std > 0: norm weights 1 + normal(0, norm_std) instead of ones (so a norm read
    from the wrong tensor, or not at all, shows)."""
    model = unmask.DiffusionTransformer.random(tiny_config(**overrides), seed=seed, std=std)
    if norm_std > 0:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(torch.randn(param.shape, generator=generator) * norm_std)
    return model


# --------------------------------------------------------------------------- sample


def tiny_mixture():
    """A tiny LLaDA 2.0-style model: a dense layer, then a mixture of 8 experts, 3 a token."""
    moe = unmask.MoeConfig(n_experts=8, experts_per_token=3, expert_hidden_size=16, n_shared_experts=1, n_groups=4,
                           top_groups=2, routed_scaling=2.5, dense_layers=1)
    return tiny_model(seed=4, d_model=64, n_heads=8, n_kv_heads=4, block_size=4, model_type="llada2", qk_norm=True,
                      attention_head_dim=8, moe=moe)


def run_sample_kernel(backend, logits, rows=None, **kwargs):
    """One native sample backend (a kernel table entry) on poisoned outputs; every output
    must be written. Returns (tokens, conf) on the CPU."""
    call = validation.sample_call(logits, rows=rows, check=False, **kwargs)
    n, device = call.n_rows, logits.device
    out = (torch.full((n,), POISON_TOKEN, dtype=torch.int64, device=device),
           torch.full((n,), float("nan"), device=device))
    tokens, conf = backend(call, out=out)
    if device.type == "cuda":
        torch.cuda.synchronize()
    tokens, conf = tokens.cpu(), conf.cpu()
    assert not (tokens == POISON_TOKEN).any() and not torch.isnan(conf).any(), "every output must be written"
    return tokens, conf


def sample_backend(device_type: str):
    return native.kernels()[("sample", device_type)]


def gumbel_scores(logits, tokens, temperature, seed, offset):
    """The reference's float64 score x / T + g of each row's token."""
    flat = logits.reshape(-1, logits.shape[-1]).float().double()
    rows = torch.arange(flat.shape[0])
    g = rng.gumbel(seed, rows, flat.shape[-1], offset=offset)
    return (flat / temperature + g).gather(-1, tokens.reshape(-1, 1).clamp(min=0)).squeeze(-1)


def assert_same_tokens(logits, expected, got, *, temperature, seed, offset):
    """Equal, except where the two tokens' exact scores are within rounding of each other
    (a near-tie that the last bit of a log may flip)."""
    mismatch = (expected != got).reshape(-1)
    if temperature == 0 or not mismatch.any():
        assert torch.equal(expected, got), f"{int(mismatch.sum())} rows differ"
        return
    a = gumbel_scores(logits, expected, temperature, seed, offset)[mismatch]
    b = gumbel_scores(logits, got, temperature, seed, offset)[mismatch]
    assert torch.allclose(a, b, rtol=1e-12, atol=0), f"rows {mismatch.nonzero().flatten().tolist()} differ by {a - b}"


def reference_banned(kwargs):
    """kwargs' banned list as the reference takes it (a tensor)."""
    banned = kwargs.get("banned")
    return {**kwargs, "banned": None if banned is None else torch.tensor(banned)}


# --------------------------------------------------------------------------- attention


def attention_in_input_dtype(q, k, v, visible, scale):
    """Plain softmax(QK^T)V with every product and the softmax in q.dtype: the baseline
    error a kernel in that dtype is allowed twice of."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ vh).transpose(1, 2)


def check_attention_against_reference(q, k, v, backend=None, **masks):
    """A native attention backend (default: the CPU kernel) against the float64 reference,
    under flash-attention's rule: its error is at most twice the error of the same
    computation done in the input dtype, plus the rounding of one output element."""
    batch, q_len, _, head_dim = q.shape
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    call = validation.attention_call(q, k, v, scale=head_dim**-0.5, **masks)
    (backend or native.kernels()[("attention", "cpu")])(call, out=out)
    exact = reference.attention(q.double(), k.double(), v.double(), **masks)
    visible = reference.visibility(batch, q_len, k.shape[1], **masks, device=q.device)
    baseline = attention_in_input_dtype(q, k, v, visible, head_dim**-0.5).double()
    error, baseline_error = (out.double() - exact).abs(), (baseline - exact).abs()
    rounding = torch.finfo(q.dtype).eps * float(v.abs().max())
    message = (f"max error {float(error.max()):.3g} vs baseline {float(baseline_error.max()):.3g}; "
               f"mean {float(error.mean()):.3g} vs {float(baseline_error.mean()):.3g}")
    assert not torch.isnan(out).any(), "unwritten or NaN outputs"
    assert float(error.max()) <= 2 * float(baseline_error.max()) + rounding, message
    assert float(error.mean()) <= 2 * float(baseline_error.mean()) + rounding / 8, message


def random_inputs(batch, q_len, k_len, q_heads, kv_heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, k_len, kv_heads, head_dim, generator=gen).to(dtype)
    return q, k, v, gen


MASKS = ["none", "kv_len", "key_valid", "block", "block_offset", "all"]


def dirty_hidden_keys(dtype, head_dim, seed=5, q_len=37):
    """Inputs whose keys past kv_len or hidden by key_valid hold NaN in a second copy of K
    and V: (q, k, v, dirty_k, dirty_v, kv_len, key_valid). A backend that never reads a
    hidden key gives both copies the same output, bit for bit."""
    q, k, v, gen = random_inputs(2, q_len, 150, 4, 2, head_dim, dtype, seed=seed)
    kv_len = torch.tensor([90, 150])
    key_valid = torch.rand(2, 150, generator=gen) > 0.2
    hidden = (torch.arange(150)[None] >= kv_len[:, None]) | ~key_valid
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[hidden], dirty_v[hidden] = float("nan"), float("nan")
    return q, k, v, dirty_k, dirty_v, kv_len, key_valid


def make_masks(kind, batch, k_len, gen):
    kv_len = torch.randint(0, k_len + 1, (batch,), generator=gen)
    key_valid = torch.rand(batch, k_len, generator=gen) > 0.25
    return {
        "none": {},
        "kv_len": {"kv_len": kv_len},
        "key_valid": {"key_valid": key_valid},
        "block": {"block_size": 16},
        "block_offset": {"block_size": 32, "q_offset": 40},
        "all": {"kv_len": kv_len, "key_valid": key_valid, "block_size": 8, "q_offset": 3},
    }[kind]
