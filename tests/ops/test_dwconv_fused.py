"""The fused 3×3 inner step (hand-written backward) against the autograd reference: outputs and every gradient,
with the batch folded into conv groups (as convolutions or, for small maps, as windowed products)
and with the batch-independent shifted products."""
import pytest
import torch

from vittt.ops import DotProductLoss, dwconv_ttt_fused
from vittt.ops.dwconv.reference import reference_dwconv_ttt

TOLERANCES = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-4, atol=2e-6)}


def _maps(batch, channels, height, width, dtype, seed, channels_last):
    """q, k, v as [B, C, H, W] views of one token-major projection output (channels-last, like the mixer's), or
    plain contiguous maps."""
    g = torch.Generator().manual_seed(seed)
    if channels_last:
        qkv = torch.randn(batch, height * width, 3 * channels + 2, generator=g, dtype=dtype, requires_grad=True)
        parts = [qkv[..., i * channels:(i + 1) * channels].reshape(batch, height, width, channels).permute(0, 3, 1, 2)
                 for i in range(3)]
    else:
        qkv = torch.randn(3, batch, channels, height, width, generator=g, dtype=dtype, requires_grad=True)
        parts = list(qkv.unbind(0))
    return qkv, parts


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('normalize', [True, False], ids=['norm', 'no-norm'])
@pytest.mark.parametrize('shape,ks', [((1, 3, 5, 7), 3), ((3, 4, 6, 6), 3), ((2, 2, 1, 4), 3), ((2, 5, 9, 8), 5)])
@pytest.mark.parametrize('channels_last', [True, False], ids=['tokens', 'nchw'])
@pytest.mark.parametrize('backend', ['grouped', 'grouped-conv', 'shifted'])
def test_fused_equals_reference(monkeypatch, shape, ks, normalize, dtype, channels_last, backend, dwconv_backend):
    """(``grouped``: these small maps take the windowed forms; ``grouped-conv``: the convolutions.)"""
    if backend == 'grouped-conv':
        import vittt.ops.dwconv.composable as composable
        monkeypatch.setattr(composable, 'WINDOWED_ELEMENTS', -1)
        monkeypatch.setattr(composable, 'WINDOWED_APPLY_ELEMENTS', -1)
    dwconv_backend(backend.split('-')[0])
    b, c, h, w = shape
    qkv, (q, k, v) = _maps(b, c, h, w, dtype, seed=h * w, channels_last=channels_last)
    weight = (0.3 * torch.randn(c, 1, ks, ks, generator=torch.Generator().manual_seed(2), dtype=dtype)).requires_grad_()
    out = dwconv_ttt_fused(q, k, v, weight, scale=1 / 3, inner_lr=0.7, normalize=normalize)
    ref = reference_dwconv_ttt(q, k, v, weight, loss=DotProductLoss(), scale=1 / 3, inner_lr=0.7, normalize=normalize)
    assert out.shape == (b, c, h, w)
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ours = torch.autograd.grad((out * target).sum(), (qkv, weight))
    theirs = torch.autograd.grad((ref * target).sum(), (qkv, weight))
    for name, a, r in zip(('qkv', 'weight'), ours, theirs):
        torch.testing.assert_close(a, r, **TOLERANCES[dtype], msg=lambda m: f'd/d{name}: {m}')


def test_fused_gradcheck():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weight = (0.3 * torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: dwconv_ttt_fused(*a, scale=0.5, inner_lr=0.9), (q, k, v, weight))


def test_zero_gradient_is_finite():
    q, k = (torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.zeros(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    dwconv_ttt_fused(q, k, v, weight, scale=1 / 3).sum().backward()
    for t in (q, k, v, weight):
        assert torch.isfinite(t.grad).all()


def test_shape_errors_name_the_problem():
    q = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r'weight must be \[C, 1, k, k\]'):
        dwconv_ttt_fused(q, q, q, torch.randn(2, 1, 2, 2), scale=1.0)
    with pytest.raises(ValueError, match=r'one \[B, C, H, W\] shape'):
        dwconv_ttt_fused(q, q[:, :1], q, torch.randn(2, 1, 3, 3), scale=1.0)
