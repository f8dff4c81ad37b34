"""Closed-form inner gradients and inner steps against autograd of the stated inner losses (float64)."""
import pytest
import torch

from vittt.ops import (DotProductLoss, MSELoss, dwconv_inner_grad, dwconv_ttt, get_inner_loss, soft_normalize,
                       swiglu_inner_grads, swiglu_ttt)
from vittt.ops.dwconv.reference import reference_dwconv_grad, reference_dwconv_ttt, shifted_dwconv
from vittt.ops.glu.reference import reference_swiglu_grads, reference_swiglu_ttt

LOSSES = [DotProductLoss(), MSELoss()]


def _qkv(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize('loss', LOSSES, ids=lambda loss: loss.name)
@pytest.mark.parametrize('shape', [(2, 3, 17, 8), (1, 2, 1, 4), (3, 1, 40, 16)])
def test_swiglu_grads_equal_autograd(loss, shape):
    q, k, v = _qkv(shape)
    b, h, n, d = shape
    w1, w2 = 0.3 * torch.randn(2, 1, h, d, d, dtype=torch.float64)
    g12 = swiglu_inner_grads(k, v, torch.cat([w1, w2], -1), loss, scale=1 / 3)
    r1, r2 = reference_swiglu_grads(k, v, w1, w2, loss, 1 / 3)
    assert g12.shape == (b, h, d, 2 * d)
    torch.testing.assert_close(g12[..., :d], r1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g12[..., d:], r2, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('loss', LOSSES, ids=lambda loss: loss.name)
@pytest.mark.parametrize('grid', [(5, 7), (1, 1), (4, 4), (2, 9)])
def test_dwconv_grad_equals_autograd(loss, grid):
    q, k, v = _qkv((2, 6, *grid), seed=1)
    w = 0.3 * torch.randn(6, 1, 3, 3, dtype=torch.float64)
    e = loss.grad(shifted_dwconv(k, w.reshape(1, 6, 3, 3).expand(2, -1, -1, -1)), v, 1 / 3, grid[0] * grid[1])
    ours = dwconv_inner_grad(k, e, 3)
    torch.testing.assert_close(ours, reference_dwconv_grad(k, v, w, loss, 1 / 3), rtol=1e-12, atol=1e-14)


def test_dwconv_grad_kernel5():
    q, k, v = _qkv((1, 3, 6, 8), seed=2)
    w = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    loss = DotProductLoss()
    ours = dwconv_inner_grad(k, loss.grad(None, v, 0.5, 48), 5)
    torch.testing.assert_close(ours, reference_dwconv_grad(k, v, w, loss, 0.5), rtol=1e-12, atol=1e-14)


def test_dot_loss_gradient_matches_spec_formula():
    """E = -(s/N) V, G1 = Kᵀ(E ⊙ SiLU(KW2)) written out by hand (spec A.2.3)."""
    q, k, v = _qkv((1, 1, 9, 4), seed=3)
    w1, w2 = torch.randn(2, 1, 1, 4, 4, dtype=torch.float64)
    s, n = 1 / 3, 9
    e = -(s / n) * v
    g1 = k.transpose(-2, -1) @ (e * torch.nn.functional.silu(k @ w2))
    ours = swiglu_inner_grads(k, v, torch.cat([w1, w2], -1), DotProductLoss(), s)[..., :4]
    torch.testing.assert_close(ours, g1, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize('normalize', [True, False])
@pytest.mark.parametrize('loss', LOSSES, ids=lambda loss: loss.name)
def test_swiglu_step_and_outer_gradients_equal_reference(normalize, loss):
    q, k, v = _qkv((2, 2, 11, 8), seed=4)
    w1, w2 = (0.2 * torch.randn(1, 2, 8, 8, dtype=torch.float64)).requires_grad_(), \
        (0.2 * torch.randn(1, 2, 8, 8, dtype=torch.float64)).requires_grad_()
    for t in (q, k, v):
        t.requires_grad_()
    kw = dict(loss=loss, scale=1 / 3, inner_lr=0.7, normalize=normalize)
    out = swiglu_ttt(q, k, v, w1, w2, **kw)
    ref = reference_swiglu_ttt(q, k, v, w1, w2, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-13)
    # the outer loop differentiates through the inner step: gradients of gradients must match too
    probe = torch.randn_like(out)
    ours = torch.autograd.grad((out * probe).sum(), (q, k, v, w1, w2))
    refs = torch.autograd.grad((ref * probe).sum(), (q, k, v, w1, w2))
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('normalize', [True, False])
@pytest.mark.parametrize('loss', LOSSES, ids=lambda loss: loss.name)
def test_dwconv_step_and_outer_gradients_equal_reference(normalize, loss):
    q, k, v = _qkv((2, 4, 6, 5), seed=5)
    w = (0.2 * torch.randn(4, 1, 3, 3, dtype=torch.float64)).requires_grad_()
    for t in (q, k, v):
        t.requires_grad_()
    kw = dict(loss=loss, scale=0.25, inner_lr=1.3, normalize=normalize)
    out = dwconv_ttt(q, k, v, w, **kw)
    ref = reference_dwconv_ttt(q, k, v, w, **kw)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-13)
    probe = torch.randn_like(out)
    ours = torch.autograd.grad((out * probe).sum(), (q, k, v, w))
    refs = torch.autograd.grad((ref * probe).sum(), (q, k, v, w))
    for a, b in zip(ours, refs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_soft_normalize_columnwise():
    g = torch.tensor([[3.0, 0.0], [4.0, 0.1]], dtype=torch.float64)  # column norms 5 and 0.1
    out = soft_normalize(g, -2)
    torch.testing.assert_close(out[:, 0], torch.tensor([0.5, 4 / 6], dtype=torch.float64))
    torch.testing.assert_close(out[:, 1], torch.tensor([0.0, 0.1 / 1.1], dtype=torch.float64))


def test_inner_step_zero_lr_is_initial_model():
    q, k, v = _qkv((1, 2, 5, 4), seed=6)
    w1, w2 = torch.randn(2, 1, 2, 4, 4, dtype=torch.float64)
    out = swiglu_ttt(q, k, v, w1, w2, loss=DotProductLoss(), scale=1 / 3, inner_lr=0.0)
    torch.testing.assert_close(out, (q @ w1) * torch.nn.functional.silu(q @ w2))


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown inner loss 'l3'"):
        get_inner_loss('l3')
