"""The SIMT interpreter's runtime (csrc/simt) on its own test kernels
(csrc/simt/test_kernels.cpp): the per-lane layouts of ldmatrix and mma against tables
written out from the PTX ISA, a GEMM through them against torch.matmul, and kernels
broken on purpose that the checks must report."""

import re

import pytest
import torch

from unmask import native
from tests.helpers import requires_interpreter

pytestmark = requires_interpreter


def run(name, data, out):
    native._C.simt_test_kernel(name, data.data_ptr(), data.numel() * data.element_size(), out.data_ptr(),
                               out.numel() * out.element_size())


def halves(words):
    words = words.to(torch.int64) & 0xFFFFFFFF
    return words & 0xFFFF, words >> 16


# --------------------------------------------------------------------------- ldmatrix


def code(matrix, row, col):
    """The 16-bit value the test stores at (row, col) of matrix `matrix`."""
    return (matrix << 8) | (row << 4) | col


def ldmatrix_table(transpose):
    """PTX ISA, "Warp-level matrix load instruction: ldmatrix", .m8n8.x4.b16: lane l receives
    in register i the fragment (row l / 4, elements 2 * (l % 4) and 2 * (l % 4) + 1, lower
    in the low half) of matrix i; with .trans, of matrix i transposed."""
    table = {}
    for lane in range(32):
        for i in range(4):
            r, c = lane // 4, 2 * (lane % 4)
            table[lane, i] = ((code(i, c, r), code(i, c + 1, r)) if transpose else (code(i, r, c), code(i, r, c + 1)))
    return table


# A few entries written out by hand from the same description, so the table above is itself checked.
LDMATRIX_SPOT_CHECKS = {
    (False, 0, 0): (0x000, 0x001), (False, 5, 2): (0x212, 0x213), (False, 31, 3): (0x376, 0x377),
    (True, 0, 0): (0x000, 0x010), (True, 5, 2): (0x221, 0x231), (True, 31, 3): (0x367, 0x377),
}


def test_ldmatrix_per_lane_layout():
    data = torch.tensor([code(i, r, c) for i in range(4) for r in range(8) for c in range(8)], dtype=torch.int16)
    out = torch.zeros(256, dtype=torch.int32)
    run("ldmatrix_layout", data, out)
    lo, hi = halves(out)
    for transpose in (False, True):
        table = ldmatrix_table(transpose)
        for lane in range(32):
            for i in range(4):
                index = 128 * transpose + lane * 4 + i
                assert (int(lo[index]), int(hi[index])) == table[lane, i], (transpose, lane, i)
    for (transpose, lane, i), expected in LDMATRIX_SPOT_CHECKS.items():
        assert ldmatrix_table(transpose)[lane, i] == expected


# --------------------------------------------------------------------------- mma


def bf16_bits(x):
    return x.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def mma_fragments(a, b, c):
    """Per-lane registers of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16 with
    floating point type"), groupID = lane / 4, threadID_in_group = lane % 4:
    A a0..a7 (two per register): row groupID for a0, a1, a4, a5, else groupID + 8; column
    2 * threadID_in_group + (i & 1), plus 8 for a4..a7. B b0..b3: row 2 * threadID_in_group +
    (i & 1), plus 8 for b2, b3; column groupID. C c0..c3: row groupID (+ 8 for c2, c3),
    column 2 * threadID_in_group + (i & 1)."""
    words = torch.zeros(32, 10, dtype=torch.int64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        a_elements = [a[g + 8 * ((i // 2) % 2), 2 * t + (i & 1) + 8 * (i >= 4)] for i in range(8)]
        b_elements = [b[2 * t + (i & 1) + 8 * (i >= 2), g] for i in range(4)]
        a_bits = bf16_bits(torch.stack(a_elements))
        b_bits = bf16_bits(torch.stack(b_elements))
        for r in range(4):
            words[lane, r] = a_bits[2 * r] | (a_bits[2 * r + 1] << 16)
        for r in range(2):
            words[lane, 4 + r] = b_bits[2 * r] | (b_bits[2 * r + 1] << 16)
        c_elements = torch.stack([c[g + 8 * (i >= 2), 2 * t + (i & 1)] for i in range(4)]).float()
        words[lane, 6:] = c_elements.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return words.to(torch.uint32).view(torch.int32)


def d_from_fragments(out):
    d = torch.zeros(16, 8)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            d[g + 8 * (i >= 2), 2 * t + (i & 1)] = out[lane, i]
    return d


def test_mma_per_lane_layout():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(torch.bfloat16).float()
    b = torch.randn(16, 8, generator=gen).to(torch.bfloat16).float()
    c = torch.randn(16, 8, generator=gen)
    out = torch.zeros(32, 4)
    run("mma_fragments", mma_fragments(a, b, c).reshape(-1), out)
    torch.testing.assert_close(d_from_fragments(out), a @ b + c, rtol=1e-6, atol=1e-5)


def test_gemm_through_ldmatrix_and_mma():
    """A [16, 16] times B [16, 16] (bf16, float accumulation) with B read two ways: from
    Bt [n][k] by ldmatrix (the K of Q K^T) and from B [k][n] by ldmatrix.trans (the V of P V)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    data = torch.cat([a.reshape(-1), b.t().contiguous().reshape(-1), b.reshape(-1)]).view(torch.int16)
    out = torch.full((2, 16, 16), float("nan"))
    run("gemm", data, out)
    expected = a.float() @ b.float()
    for variant in range(2):
        torch.testing.assert_close(out[variant], expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the checks


def test_barrier_orders_a_handoff_and_its_absence_is_a_race():
    data, out = torch.arange(32, dtype=torch.float32), torch.zeros(32)
    run("handoff", data, out)
    assert torch.equal(out, data * 2)
    with pytest.raises(RuntimeError, match=re.escape(
            "kernel handoff_kernel, block (0, 0, 0), thread (32, 0, 0): race on dynamic shared memory byte 0: "
            "thread (0, 0, 0) wrote it and thread (32, 0, 0) reads it with no __syncthreads between")):
        run("handoff_missing_barrier", data, out)


def test_lanes_of_a_warp_are_ordered_only_by_a_warp_sync():
    data, out = torch.tensor([7.0]), torch.zeros(1)
    run("lane_handoff", data, out)
    assert out.item() == 7.0
    with pytest.raises(RuntimeError, match="thread \\(0, 0, 0\\) wrote it and thread \\(1, 0, 0\\) reads it"):
        run("lane_handoff_missing_syncwarp", data, out)


def test_an_off_by_one_bound_reads_past_the_buffer():
    data, out = torch.arange(100, dtype=torch.float32), torch.zeros(100)
    with pytest.raises(RuntimeError, match=re.escape(
            "kernel off_by_one_kernel, block (0, 0, 0), thread (4, 0, 0): read of 4 bytes at byte 400 of buffer "
            "'data' (400 bytes): outside it")):
        run("off_by_one", data, out)
    # Threads run one after another until they block: threads 0-3 finished, thread 4 failed
    # at its fourth element, the bad read never ran and the rest of the block was dropped.
    assert torch.equal(out[:5], data[:5]) and out[5] == 0


def test_a_write_past_the_declared_shared_memory():
    data, out = torch.arange(33, dtype=torch.float32), torch.zeros(33)
    with pytest.raises(RuntimeError, match="write of 4 bytes at dynamic shared offset 128, outside the 128 bytes"):
        run("shared_overflow", data, out)


def test_cp_async_lands_at_the_wait():
    data = torch.arange(128, dtype=torch.int32)
    out = torch.full((128,), -5, dtype=torch.int32)
    run("cp_async", data, out)
    assert torch.equal(out, data)
    # On a GPU a read before the wait may see the old bytes or the new: an error here.
    with pytest.raises(RuntimeError, match=re.escape(
            "thread (31, 0, 0): reads dynamic shared memory byte 496 that a cp.async of thread (31, 0, 0) "
            "has not landed yet")):  # (the last thread at the barrier runs on first)
        run("cp_async_read_before_wait", data, out)


def test_a_shuffle_orders_no_memory():
    """Lanes exchange registers in a shuffle, but a shared write before it is not ordered
    with a read after it (only __syncwarp or a barrier does that)."""
    with pytest.raises(RuntimeError, match="thread \\(0, 0, 0\\) wrote it and thread \\(1, 0, 0\\) reads it"):
        run("shuffle_ordered_handoff", torch.tensor([7.0] * 32), torch.zeros(1))


def test_static_shared_is_fresh_per_block_and_race_checked():
    out = torch.zeros(3)
    run("static_counter", torch.zeros(1), out)
    assert torch.equal(out, torch.full((3,), 64.0)), "each block counts its own 64 threads"
    with pytest.raises(RuntimeError, match=re.escape(
            "thread (1, 0, 0): race: an atomic on static shared memory byte 0 meets a plain access of another "
            "thread with no __syncthreads between")):
        run("static_counter_missing_barrier", torch.zeros(1), out)


def test_a_write_past_a_static_shared_array():
    data, out = torch.arange(33, dtype=torch.float32), torch.zeros(33)
    with pytest.raises(RuntimeError, match="write of 4 bytes at static shared offset 128, outside every __shared__"):
        run("static_overflow", data, out)


def test_a_barrier_some_threads_never_reach():
    with pytest.raises(RuntimeError, match="__syncthreads in a block where 16 threads have ended"):
        run("divergent_barrier", torch.zeros(32), torch.zeros(32))


def test_a_warp_collective_some_lanes_skip():
    with pytest.raises(RuntimeError, match="the thread ended while its warp waits in a shuffle"):
        run("divergent_shuffle", torch.zeros(32), torch.zeros(32))


def test_unknown_test_kernel_is_refused():
    with pytest.raises(ValueError, match="params.name"):
        run("no_such_kernel", torch.zeros(1), torch.zeros(1))


def test_stats_count_threads_and_switches():
    native._C.simt_reset_stats()
    run("handoff", torch.zeros(32), torch.zeros(32))
    stats = native._C.simt_stats()
    assert stats["launches"] == 1 and stats["blocks"] == 1 and stats["threads"] == 64
    assert stats["switches"] >= 2 * 64 and stats["seconds"] > 0


def test_generate_through_the_interpreted_cuda_kernels(monkeypatch):
    """UNMASK_BACKEND=interpret: CPU tensors take the CUDA kernels under the interpreter
    where they take the call (bf16 attention at head_dim 64, sampling, commit): the tokens
    of the CPU kernels' run (UNMASK_BACKEND=native)."""
    import unmask
    from tests.helpers import tiny_model

    model = tiny_model(seed=3, d_model=128, n_heads=2, n_kv_heads=1, mlp_hidden_size=64).to(torch.bfloat16)
    kwargs = dict(gen_length=16, block_length=8, threshold=0.5, stop_at_eos=False)
    monkeypatch.setenv("UNMASK_BACKEND", "native")  # the CPU kernels (auto would send bf16 attention to SDPA)
    # in float32 arithmetic, as the CUDA kernels' (the amx build's rounds P to bfloat16 for its tiles)
    float32_isa = next(isa for isa in native.runnable_cpu_isas() if isa != "amx")
    with native.cpu_isa_forced(float32_isa):
        expected = unmask.generate(model, [[1, 2, 3], [4, 5]], **kwargs)
    monkeypatch.setenv("UNMASK_BACKEND", "interpret")
    q = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16)
    assert unmask.ops.backend_for("attention", q, q[:, :, :1], q[:, :, :1]) == "cuda-interpreter"
    native._C.simt_reset_stats()
    got = unmask.generate(model, [[1, 2, 3], [4, 5]], **kwargs)
    assert native._C.simt_stats()["launches"] > 0
    assert torch.equal(got.tokens, expected.tokens)
