"""The fused SwiGLU inner step (hand-written backward) against the autograd reference: outputs and every gradient."""
import pytest
import torch

from vittt.ops import DotProductLoss, swiglu_ttt_fused
from vittt.ops.glu.reference import reference_swiglu_ttt

TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-6)}


def _qkv_views(batch, tokens, heads, head_dim, dtype, seed):
    """q, k, v as strided [B, N, h, d] views of one projection output with a few extra columns (like the mixer's)."""
    g = torch.Generator().manual_seed(seed)
    width = heads * head_dim
    qkv = torch.randn(batch, tokens, 3 * width + 5, generator=g, dtype=dtype, requires_grad=True)
    parts = [qkv[..., i * width:(i + 1) * width].reshape(batch, tokens, heads, head_dim) for i in range(3)]
    w1, w2 = (0.3 * torch.randn(2, 1, heads, head_dim, head_dim, generator=g, dtype=dtype)).unbind(0)
    return qkv, parts, w1.requires_grad_(), w2.requires_grad_()


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('normalize', [True, False], ids=['norm', 'no-norm'])
@pytest.mark.parametrize('shape', [(1, 7, 2, 4), (3, 13, 3, 8), (2, 1, 1, 5), (2, 49, 6, 16), (5, 9, 2, 4)])
def test_fused_equals_reference(shape, normalize, dtype):
    b, n, h, d = shape
    qkv, (q, k, v), w1, w2 = _qkv_views(b, n, h, d, dtype, seed=n)
    out = swiglu_ttt_fused(q, k, v, torch.cat([w1, w2], -1)[0], scale=1 / 3, inner_lr=0.7, normalize=normalize)
    ref = reference_swiglu_ttt(*(t.transpose(1, 2) for t in (q, k, v)), w1, w2, loss=DotProductLoss(), scale=1 / 3,
                               inner_lr=0.7, normalize=normalize).transpose(1, 2)
    assert out.shape == (b, n, h, d)
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ours = torch.autograd.grad((out * weights).sum(), (qkv, w1, w2))
    theirs = torch.autograd.grad((ref * weights).sum(), (qkv, w1, w2))
    for name, a, r in zip(('qkv', 'w1', 'w2'), ours, theirs):
        torch.testing.assert_close(a, r, **TOLERANCES[dtype], msg=lambda m: f'd/d{name}: {m}')


def test_fused_gradcheck():
    """Finite differences of the hand-written backward itself (float64, soft normalisation on)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 5, 2, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w12 = (0.3 * torch.randn(2, 3, 6, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: swiglu_ttt_fused(*a, scale=0.5, inner_lr=0.9), (q, k, v, w12))


def test_zero_gradient_is_finite():
    """All-zero values make every inner gradient zero: the soft normalisation's backward must not divide by 0."""
    q, k = (torch.randn(1, 4, 1, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.zeros(1, 4, 1, 3, dtype=torch.float64, requires_grad=True)
    w12 = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    swiglu_ttt_fused(q, k, v, w12, scale=1 / 3).sum().backward()
    for t in (q, k, v, w12):
        assert torch.isfinite(t.grad).all()


def test_shape_errors_name_the_problem():
    q = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match=r'w12 must be \[h, d, 2d\]'):
        swiglu_ttt_fused(q, q, q, torch.randn(2, 3, 3), scale=1.0)
    with pytest.raises(ValueError, match='one \\[B, N, h, d\\] shape'):
        swiglu_ttt_fused(q, q[:, :3], q, torch.randn(2, 3, 6), scale=1.0)


@pytest.mark.parametrize('batch,heads', [(1, 3), (4, 2)])  # batched over heads and over samples
def test_out_writes_the_result_into_a_strided_slice(batch, heads):
    """``out=`` (inference): the result lands in a slice of a wider token-major buffer, the rest is untouched."""
    _, (q, k, v), w1, w2 = _qkv_views(batch, 11, heads, 4, torch.float32, seed=2)
    w12 = torch.cat([w1, w2], -1)[0].detach()
    q, k, v = q.detach(), k.detach(), v.detach()
    expected = swiglu_ttt_fused(q, k, v, w12, scale=1 / 3, inner_lr=0.7)
    buffer = torch.full((batch, 11, heads * 4 + 3), 7.0)
    target = buffer[..., 1:1 + heads * 4].unflatten(-1, (heads, 4))
    with torch.no_grad():
        out = swiglu_ttt_fused(q, k, v, w12, scale=1 / 3, inner_lr=0.7, out=target)
    assert out.data_ptr() == target.data_ptr() and out.stride() == target.stride()
    torch.testing.assert_close(buffer[..., 1:1 + heads * 4], expected.flatten(-2), rtol=0, atol=0)
    assert (buffer[..., 0] == 7).all() and (buffer[..., -2:] == 7).all()


def test_out_is_for_inference_and_checked():
    qkv, (q, k, v), w1, w2 = _qkv_views(1, 5, 2, 3, torch.float32, seed=0)
    w12 = torch.cat([w1, w2], -1)[0]
    with pytest.raises(ValueError, match='out= is for inference'):
        swiglu_ttt_fused(q, k, v, w12, scale=1.0, out=torch.empty(1, 5, 2, 3))
    shape_message = r'out must be a torch.float32 tensor of shape \(1, 5, 2, 3\)'
    with torch.no_grad(), pytest.raises(ValueError, match=shape_message):
        swiglu_ttt_fused(q, k, v, w12, scale=1.0, out=torch.empty(1, 5, 6))
