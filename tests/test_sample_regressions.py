"""Regression tests for the sampling bugs of issue #23 (found by running the CUDA kernels
on the CPU), through the reference, the CPU kernel under each instruction set this CPU
runs, and the CUDA kernel on a GPU and under the SIMT interpreter:

1. an empty `rows` tensor sampled every row (its data pointer is null, which the kernels
   read as "no row subset");
2. entropy confidence was NaN on CUDA when a logit lay far below the row maximum
   ((x - max) / conf_temperature overflowed to -inf, and 0 * -inf is NaN);
3. row ids were not bounds-checked when the op's check was off.
"""

import re

import numpy as np
import pytest
import torch

from unmask import native, ops, reference
from tests.helpers import (ENTROPY_ATOL, CudaRunner, requires_cuda_build, requires_extension,
                           requires_gpu, requires_interpreter, run_sample_kernel, sample_backend)

FLT_MAX = float(np.finfo(np.float32).max)
NEG_MAX = "-max"  # stands for minus the dtype's largest finite value (-FLT_MAX is -inf in bfloat16)


def reference_backend(logits, rows=None, **kwargs):
    tokens, conf = reference.sample(logits, rows=rows, **kwargs)
    return tokens.cpu(), conf.cpu()


def cpu_backend(isa):
    def run(logits, rows=None, **kwargs):
        with native.cpu_isa_forced(isa):
            return run_sample_kernel(sample_backend("cpu"), logits, rows=rows, **kwargs)
    return run


def cuda_backend(runner_name):
    runner = CudaRunner(runner_name)

    def run(logits, rows=None, **kwargs):
        return run_sample_kernel(runner.backend("sample"), logits.to(runner.device),
                                 rows=None if rows is None else rows.to(runner.device), **kwargs)
    return run


BACKENDS = [
    pytest.param(reference_backend, id="reference"),
    *(pytest.param(cpu_backend(isa), id=f"cpu-{isa}") for isa in native.runnable_cpu_isas()),
    pytest.param(cuda_backend("gpu"), id="cuda", marks=[requires_cuda_build, requires_gpu]),
    pytest.param(cuda_backend("interpreter"), id="cuda-interpreter", marks=requires_interpreter),
]


# --------------------------------------------------------------------------- 1. empty rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_empty_rows_sample_nothing(backend, temperature):
    logits = torch.randn(5, 1000)
    tokens, conf = backend(logits, rows=torch.empty(0, dtype=torch.int64), temperature=temperature)
    assert tokens.tolist() == [-1] * 5 and torch.isneginf(conf).all()


def test_empty_rows_through_the_op():
    tokens, conf = ops.sample(torch.randn(5, 1000), rows=torch.empty(0, dtype=torch.long))
    assert tokens.tolist() == [-1] * 5 and torch.isneginf(conf).all()


# --------------------------------------------------------------------------- 2. entropy at extreme logits


ENTROPY_CASES = [
    # (logits of one row, NEG_MAX for minus the dtype's largest finite value, conf_temperature):
    # the reference gives a finite entropy for each
    pytest.param([0.0, NEG_MAX], 0.5, id="-max at T=0.5"),
    pytest.param([0.0, -1e38, 1.0, -3e38], 0.05, id="-1e38 at T=0.05"),
    # two -max before a larger logit, in the ids one CUDA thread reads (one 16-byte load)
    pytest.param([NEG_MAX, NEG_MAX, 0.0, -1.0], 1.0, id="-max twice then 0 at T=1"),
    pytest.param([NEG_MAX] * 3 + [2.0] + [NEG_MAX] * 4 + [1.0], 2.0, id="runs of -max at T=2"),
]


def extreme_row(row, dtype):
    largest = torch.finfo(dtype).max
    return torch.tensor([[-largest if value == NEG_MAX else value for value in row]], dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("row,conf_temperature", ENTROPY_CASES)
def test_entropy_far_below_the_maximum_is_finite(backend, dtype, row, conf_temperature):
    logits = extreme_row(row, dtype)
    assert torch.isfinite(logits).all(), "the case must hold finite extremes, not -inf"
    expected = reference.sample(logits, confidence="entropy", conf_temperature=conf_temperature)[1]
    assert torch.isfinite(expected).all()
    tokens, conf = backend(logits, confidence="entropy", conf_temperature=conf_temperature)
    assert torch.isfinite(conf).all(), f"entropy confidence {conf.tolist()}"
    torch.testing.assert_close(conf.double(), expected.double(), rtol=0, atol=ENTROPY_ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_of_many_rows_with_extreme_logits(backend):
    """Rows of a real vocabulary where most logits are near -FLT_MAX (as a model that masks
    ids with the lowest float produces), with the split and unsplit CUDA paths."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(33, 4099, generator=gen)
    logits[:, ::3] = -FLT_MAX
    logits[::2, 1::7] = -1e38
    expected = reference.sample(logits, confidence="entropy", conf_temperature=0.05)[1]
    tokens, conf = backend(logits, confidence="entropy", conf_temperature=0.05)
    torch.testing.assert_close(conf.double(), expected.double(), rtol=1e-5, atol=ENTROPY_ATOL)


# --------------------------------------------------------------------------- 3. row ids out of range


@pytest.mark.parametrize("check", [True, False])
def test_cpu_rows_out_of_range_are_refused_by_the_op(check):
    with pytest.raises(ValueError, match=re.escape("rows must lie in [0, 4)")):
        ops.sample(torch.randn(4, 50), rows=torch.tensor([1, 4]), check=check)
    with pytest.raises(ValueError, match=re.escape("rows must lie in [0, 4)")):
        ops.sample(torch.randn(4, 50), rows=torch.tensor([-1]), check=check)


@requires_extension
@pytest.mark.usefixtures("cpu_isa")
def test_cpu_kernel_refuses_rows_out_of_range():
    from unmask import validation

    logits = torch.randn(4, 50)
    call = validation.sample_call(logits, check=False)
    call = validation.SampleCall(logits, call.options, None, torch.tensor([2, 9]), False)  # past the op's checks
    with pytest.raises(ValueError, match=re.escape("params.rows[i] = 9 must lie in [0, n_rows)")):
        sample_backend("cpu")(call)


def test_reference_skips_rows_out_of_range():
    logits = torch.randn(4, 50)
    tokens, conf = reference.sample(logits, rows=torch.tensor([2, 9, -3]))
    expected = reference.sample(logits, rows=torch.tensor([2]))
    assert torch.equal(tokens, expected[0]) and torch.equal(conf, expected[1])


def test_cuda_kernel_skips_rows_out_of_range_unchecked(cuda_runner):
    """With check=False on a GPU the ids are not read on the host: the kernel skips the
    bad ones (no read or write out of bounds, which the interpreter would report) and
    samples the rest."""
    from unmask import validation

    logits = torch.randn(4, 5000, device=cuda_runner.device)
    rows = torch.tensor([2, 9, -3, 0], device=cuda_runner.device)
    call = validation.sample_call(logits, rows=rows[:1], check=False)
    call = validation.SampleCall(logits, call.options, None, rows, False)  # past the op's checks
    tokens, conf = cuda_runner.backend("sample")(call)
    cuda_runner.synchronize()
    expected = reference.sample(logits.cpu(), rows=torch.tensor([2, 0]))
    assert torch.equal(tokens.cpu(), expected[0])
    torch.testing.assert_close(conf.cpu(), expected[1], rtol=1e-5, atol=0)
