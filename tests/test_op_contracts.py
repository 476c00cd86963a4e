"""The torch custom ops as users reach them besides unmask.ops' wrappers: torch.ops.unmask.*
called directly (public, and what a compiled graph calls) check their arguments as the
wrappers do; and torch.compile(fullgraph=True) of calls the wrappers take eagerly."""

import pytest
import torch

from unmask import ops

Q = torch.randn(1, 4, 2, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("call,exception,message", [
    # a bf16 k read as float32 ran past k's end; a short key_valid was read past its end
    (lambda: torch.ops.unmask.attention(Q, Q.bfloat16(), Q.bfloat16(), None, None, 0, 0, 0.25), TypeError,
     "q, k and v must share a dtype"),
    (lambda: torch.ops.unmask.attention(Q, Q, Q, None, torch.ones(1, 2, dtype=torch.bool), 0, 0, 0.25), ValueError,
     "key_valid must have shape"),
    # tokens [1, 1] beside x [4, 1000] wrote heap memory into x
    (lambda: torch.ops.unmask.commit(torch.zeros(4, 1000, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                                     torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.tensor([1000]), None,
                                     None), ValueError, "tokens must have shape"),
    (lambda: torch.ops.unmask.sample(torch.randn(2, 5), 0.0, 0, 1.0, None, "prob", 1.0, 0, 0, None, torch.tensor([7]),
                                     False), ValueError, "rows must lie in"),
    # an expanded canvas: the kernel ran, then the copy back failed with torch's message
    (lambda: ops.commit(torch.zeros(1, 6, dtype=torch.long).expand(3, 6), torch.ones(3, 6, dtype=torch.long),
                        torch.rand(3, 6), torch.ones(3, 6, dtype=torch.bool), threshold=0.5), ValueError,
     "x must not overlap itself"),
])
def test_the_ops_called_directly_check_their_arguments(call, exception, message):
    with pytest.raises(exception, match=message):
        call()


def test_compiled_calls_the_wrappers_take_eagerly():
    # sample with rows and check=True: the row check read the traced ids (a data-dependent
    # guard); commit with a transposed eligible: the fake promised eligible's strides, the
    # kernel returns a contiguous [B, L]; attention's gradient: the reference's backward
    # read whether V is finite on the host
    logits, rows = torch.randn(3, 7, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2])
    sample = torch.compile(lambda lg, r: ops.sample(lg, rows=r), fullgraph=True, backend="aot_eager")
    assert torch.equal(sample(logits, rows)[0], ops.sample(logits, rows=rows)[0])

    eligible = torch.ones(6, 2, dtype=torch.bool).t()
    x, tokens, conf = torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 6, dtype=torch.long), torch.rand(2, 6)
    commit = torch.compile(lambda *a: ops.commit(*a, threshold=0.5).view(-1), fullgraph=True, backend="aot_eager")
    assert torch.equal(commit(x.clone(), tokens, conf, eligible), ops.commit(x.clone(), tokens, conf, eligible,
                                                                              threshold=0.5).view(-1))

    q = Q.clone().requires_grad_()
    loss = torch.compile(lambda q: ops.attention(q, q.detach(), q.detach()).sum(), fullgraph=True,
                         backend="aot_eager")
    loss(q).backward()
    eager = Q.clone().requires_grad_()
    ops.attention(eager, eager.detach(), eager.detach()).sum().backward()
    torch.testing.assert_close(q.grad, eager.grad)


def test_forward_mode_and_torch_func_transforms_see_through_the_ops():
    """Inside a forward-AD level or a torch.func transform the ops run the reference's
    torch operations: the kernels dropped the tangent (dual tensors carry no
    requires_grad) or could not read functorch's wrapped tensors."""
    from torch.func import jvp, vmap

    from unmask import reference

    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 8, generator=gen), torch.rand(8, generator=gen) + 0.5
    q, k, v = (torch.randn(2, 5, 2, 8, generator=gen) for _ in range(3))
    cos, sin = torch.rand(1, 5, 1, 8, generator=gen), torch.rand(1, 5, 1, 8, generator=gen)
    cases = [
        (lambda t: ops.rms_norm(t, weight, 1e-6), lambda t: reference.rms_norm(t, weight, 1e-6), x),
        (lambda t: ops.rotary(t, cos, sin), lambda t: reference.rotary(t, cos, sin), q),
        (lambda t: ops.attention(t, k, v, block_size=2), lambda t: reference.attention(t, k, v, block_size=2), q),
    ]
    for op, ref, primal in cases:
        tangent = torch.randn(primal.shape, generator=gen)
        got, got_tangent = jvp(op, (primal,), (tangent,))
        want, want_tangent = jvp(ref, (primal,), (tangent,))
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_tangent, want_tangent)
        assert got_tangent.abs().sum() > 0
        stacked = torch.stack([primal, primal * 2])
        torch.testing.assert_close(vmap(op)(stacked), torch.stack([ref(primal), ref(primal * 2)]))
