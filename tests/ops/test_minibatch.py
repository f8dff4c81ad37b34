"""Mini-batch TTT (TTT-Linear / TTT-MLP): dual form = token-by-token primal reference, closed-form gradients =
autograd, the mini-batch causality rule, and mini-batch N = one full-batch step. All float64."""
import pytest
import torch
import torch.nn.functional as F

from vittt.ops import gelu_grad, ln_l2_grad, minibatch_coefficients, ttt_scan
from vittt.ops.scan import layer_norm
from vittt.ops.scan.reference import reference_ttt_scan

B, H, N, D, M = 2, 2, 11, 4, 8


def _inputs(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(B, H, n, generator=g, dtype=torch.float64)
    return q, k, v, lr


def _state(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=0.3: scale * torch.randn(*s, generator=g, dtype=torch.float64)
    state = dict(ln_weight=1 + r(H, 1, D, scale=0.1), ln_bias=r(H, 1, D, scale=0.1))
    if kind == 'linear':
        state.update(w=r(H, D, D), b=r(H, 1, D, scale=0.1))
    else:
        state.update(w1=r(H, D, M), b1=r(H, 1, M, scale=0.1), w2=r(H, M, D), b2=r(H, 1, D, scale=0.1))
    return state


@pytest.mark.parametrize('kind', ['linear', 'mlp'])
@pytest.mark.parametrize('mini_batch_size', [1, 3, 4, N, 32])  # 1, non-dividing, dividing-ish, N, larger than N
@pytest.mark.parametrize('causal', [False, True])
def test_dual_form_equals_primal_reference(kind, mini_batch_size, causal):
    q, k, v, lr = _inputs()
    state = _state(kind)
    kw = dict(mini_batch_size=mini_batch_size, causal=causal)
    torch.testing.assert_close(ttt_scan(kind, q, k, v, lr, state, **kw),
                               reference_ttt_scan(kind, q, k, v, lr, state, **kw), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_outer_gradients_equal_reference(kind):
    q, k, v, lr = (t[:1, :1, :7].clone().requires_grad_() for t in _inputs(seed=2))
    state = {n: t[:1].clone().requires_grad_() for n, t in _state(kind, seed=3).items()}
    kw = dict(mini_batch_size=3, causal=False)
    out = ttt_scan(kind, q, k, v, lr, state, **kw)
    ref = reference_ttt_scan(kind, q, k, v, lr, state, **kw)
    leaves = [q, k, v, lr, *state.values()]
    probe = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * probe).sum(), leaves), torch.autograd.grad((ref * probe).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_ln_l2_grad_equals_autograd():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    target, w, b = torch.randn(5, 7, 6, generator=g, dtype=torch.float64), 1 + torch.randn(6, dtype=torch.float64), \
        torch.randn(6, dtype=torch.float64)
    loss = 0.5 * (F.layer_norm(z, (6,), w, b, eps=1e-6) - target).pow(2).sum()
    expected, = torch.autograd.grad(loss, z)
    torch.testing.assert_close(ln_l2_grad(z, target, w, b, 1e-6), expected, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(layer_norm(z, w, b, 1e-6), F.layer_norm(z, (6,), w, b, eps=1e-6))


def test_gelu_grad_equals_autograd():
    z = torch.linspace(-6, 6, 101, dtype=torch.float64, requires_grad=True)
    expected, = torch.autograd.grad(F.gelu(z).sum(), z)
    torch.testing.assert_close(gelu_grad(z.detach()), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_one_mini_batch_of_all_tokens_is_one_full_batch_step(kind):
    """b = N, non-causal: W' = W − ∇ Σ_j (lr_j / N) ℓ_j(W), then f_W'(q) — written with autograd of the total loss."""
    q, k, v, lr = _inputs(seed=5)
    state = _state(kind, seed=6)
    names = ['w', 'b'] if kind == 'linear' else ['w1', 'b1', 'w2', 'b2']
    params = {n: state[n].unsqueeze(0).expand(B, *state[n].shape).clone().requires_grad_() for n in names}
    ln = lambda z: layer_norm(z, state['ln_weight'], state['ln_bias'], 1e-6)
    pre = (lambda x, p: x @ p['w'] + p['b']) if kind == 'linear' else \
        (lambda x, p: F.gelu(x @ p['w1'] + p['b1']) @ p['w2'] + p['b2'])
    per_token = 0.5 * (ln(pre(k, params)) - (v - k)).pow(2).sum(-1)       # [B, H, N]
    grads = torch.autograd.grad((per_token * lr / N).sum(), [params[n] for n in names])
    stepped = {n: params[n] - g for n, g in zip(names, grads)}
    expected = q + ln(pre(q, stepped))
    for size in (N, N + 1, 1000):
        torch.testing.assert_close(ttt_scan(kind, q, k, v, lr, state, mini_batch_size=size), expected,
                                   rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize('causal', [False, True])
def test_causality_rule(causal):
    """Perturbing token t changes no output before t's mini-batch (and, causally, none before t)."""
    q, k, v, lr = _inputs(seed=7, n=13)
    state = _state('linear', seed=8)
    base = ttt_scan('linear', q, k, v, lr, state, mini_batch_size=4, causal=causal)
    for t in (0, 5, 6, 12):
        kp, vp = k.clone(), v.clone()
        kp[..., t, :] += 1.0
        vp[..., t, :] -= 1.0
        out = ttt_scan('linear', q, kp, vp, lr, state, mini_batch_size=4, causal=causal)
        changed = (out - base).abs().amax(dim=(0, 1, 3)) > 1e-12
        first = t if causal else (t // 4) * 4
        assert not changed[:first].any(), f'token {t} changed an earlier output'
        assert changed[max(first, t + 1 if not causal else t):].all() if t < 12 else changed[t]


def test_coefficients():
    c = minibatch_coefficients(3, causal=True, dtype=torch.float64)
    torch.testing.assert_close(c, torch.tensor([[1, 0, 0], [0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3]], dtype=torch.float64))
    assert torch.equal(minibatch_coefficients(4, causal=False), torch.full((4, 4), 0.25))


def test_unknown_inner_model():
    q, k, v, lr = _inputs()
    with pytest.raises(ValueError, match="'linear' or 'mlp'"):
        ttt_scan('rnn', q, k, v, lr, {}, mini_batch_size=4)
