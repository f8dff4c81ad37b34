"""The fast mini-batch TTT scan (``ttt_scan_fused``) is the same function as the composable dual form (``ttt_scan``)
and the token-by-token primal reference: outputs and the gradients of every input and state tensor, TTT-Linear and
TTT-MLP, causal or not, mini-batch sizes that divide N or not (and ≥ N), per-head and per-sample states, float64 and
float32, with and without autograd (two code paths: a list of states stacked afterwards, or one preallocated
stack written in place)."""
import pytest
import torch

from vittt.ops import ln_l2_grad, ln_l2_grad_parts, ttt_scan, ttt_scan_fused
from vittt.ops.scan.reference import reference_ttt_scan

B, H, N, D, M = 2, 2, 11, 4, 8
SIZES = [1, 3, 4, N, N + 5]  # 1, non-dividing (last mini-batch of 2), non-dividing (of 3), N, larger than N
F64 = dict(rtol=1e-11, atol=1e-12)
F32 = dict(rtol=1e-4, atol=1e-5)


def _inputs(seed=0, n=N, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for _ in range(3))
    lr = torch.rand(B, H, n, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (q, k, v, lr))


def _state(kind, seed=1, per_sample=False, dtype=torch.float64):
    """Per head ``[H, ...]``, or per sample ``[B, H, ...]`` (every sample its own values)."""
    g = torch.Generator().manual_seed(seed)
    lead = (B, H) if per_sample else (H,)
    r = lambda *s, scale=0.3: scale * torch.randn(*lead, *s, generator=g, dtype=torch.float64)
    state = dict(ln_weight=1 + r(1, D, scale=0.1), ln_bias=r(1, D, scale=0.1))
    if kind == 'linear':
        state.update(w=r(D, D), b=r(1, D, scale=0.1))
    else:
        state.update(w1=r(D, M), b1=r(1, M, scale=0.1), w2=r(M, D), b2=r(1, D, scale=0.1))
    return {name: t.to(dtype) for name, t in state.items()}


def _per_sample_scan(scan, kind, q, k, v, lr, state, **kw):
    """A per-sample state run sample by sample (each sample's state as the per-head state)."""
    return torch.cat([scan(kind, q[i:i + 1], k[i:i + 1], v[i:i + 1], lr[i:i + 1],
                           {name: t[i] for name, t in state.items()}, **kw) for i in range(q.shape[0])])


def _leaves(*tensors, state):
    return [t.clone().requires_grad_() for t in tensors], {n: t.clone().requires_grad_() for n, t in state.items()}


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('mini_batch_size', SIZES)
@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_equals_composable_and_reference_float64(kind, mini_batch_size, causal):
    q, k, v, lr = _inputs()
    state = _state(kind)
    kw = dict(mini_batch_size=mini_batch_size, causal=causal)
    fast = ttt_scan_fused(kind, q, k, v, lr, state, **kw)
    assert fast.shape == (B, H, N, D)
    torch.testing.assert_close(fast, reference_ttt_scan(kind, q, k, v, lr, state, **kw), **F64)
    torch.testing.assert_close(fast, ttt_scan(kind, q, k, v, lr, state, **kw), **F64)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('mini_batch_size', SIZES)
@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_per_sample_states(kind, mini_batch_size, causal):
    q, k, v, lr = _inputs(seed=2)
    state = _state(kind, seed=3, per_sample=True)
    kw = dict(mini_batch_size=mini_batch_size, causal=causal)
    fast = ttt_scan_fused(kind, q, k, v, lr, state, **kw)
    torch.testing.assert_close(fast, _per_sample_scan(reference_ttt_scan, kind, q, k, v, lr, state, **kw), **F64)
    torch.testing.assert_close(fast, _per_sample_scan(ttt_scan, kind, q, k, v, lr, state, **kw), **F64)
    # a per-sample state whose samples are all the same is the per-head state
    shared = _state(kind, seed=3)
    repeated = {name: t.expand(B, *t.shape) for name, t in shared.items()}
    torch.testing.assert_close(ttt_scan_fused(kind, q, k, v, lr, repeated, **kw),
                               ttt_scan_fused(kind, q, k, v, lr, shared, **kw), rtol=0, atol=0)


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('mini_batch_size', [1, 3, N + 5])
@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_float32(kind, mini_batch_size, causal):
    q, k, v, lr = _inputs(seed=4, dtype=torch.float32)
    state = _state(kind, seed=5, dtype=torch.float32)
    kw = dict(mini_batch_size=mini_batch_size, causal=causal)
    fast = ttt_scan_fused(kind, q, k, v, lr, state, **kw)
    assert fast.dtype == torch.float32
    exact = reference_ttt_scan(kind, *(t.double() for t in (q, k, v, lr)), {n: t.double() for n, t in state.items()},
                               **kw)
    torch.testing.assert_close(fast, exact.float(), **F32)
    torch.testing.assert_close(fast, ttt_scan(kind, q, k, v, lr, state, **kw), **F32)


@pytest.mark.parametrize('per_sample', [False, True], ids=['per_head', 'per_sample'])
@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('mini_batch_size', SIZES)
@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_gradients_equal_composable(kind, mini_batch_size, causal, per_sample):
    """Gradients of q, k, v, lr and every state tensor; the composable path is itself checked against the reference
    (tests/ops/test_minibatch.py, and test_gradients_equal_reference below)."""
    inputs, state = _leaves(*_inputs(seed=6), state=_state(kind, seed=7, per_sample=per_sample))
    kw = dict(mini_batch_size=mini_batch_size, causal=causal)
    fast = ttt_scan_fused(kind, *inputs, state, **kw)
    slow = (_per_sample_scan(ttt_scan, kind, *inputs, state, **kw) if per_sample
            else ttt_scan(kind, *inputs, state, **kw))
    torch.testing.assert_close(fast, slow, **F64)
    leaves = [*inputs, *state.values()]
    probe = torch.randn(fast.shape, generator=torch.Generator().manual_seed(8), dtype=fast.dtype)
    fast_grads = torch.autograd.grad((fast * probe).sum(), leaves)
    slow_grads = torch.autograd.grad((slow * probe).sum(), leaves)
    names = ['q', 'k', 'v', 'lr', *state]
    for name, a, b in zip(names, fast_grads, slow_grads):
        assert a.abs().sum() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11, msg=lambda m: f'{name}: {m}')


@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_gradients_equal_reference(kind, causal):
    """Against the token-by-token autograd reference directly (small: the reference's backward is O(N·b) graphs),
    per-sample states, a shorter last mini-batch."""
    inputs, state = _leaves(*(t[:, :1, :7] for t in _inputs(seed=9)),
                            state={n: t[:, :1] for n, t in _state(kind, seed=10, per_sample=True).items()})
    kw = dict(mini_batch_size=3, causal=causal)
    fast = ttt_scan_fused(kind, *inputs, state, **kw)
    ref = _per_sample_scan(reference_ttt_scan, kind, *inputs, state, **kw)
    leaves = [*inputs, *state.values()]
    probe = torch.randn(fast.shape, generator=torch.Generator().manual_seed(11), dtype=fast.dtype)
    fast_grads = torch.autograd.grad((fast * probe).sum(), leaves)
    for a, b in zip(fast_grads, torch.autograd.grad((ref * probe).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('causal', [False, True])
@pytest.mark.parametrize('mini_batch_size', [1, 3, 4, N])
@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_no_autograd_path_equals_autograd_path(kind, mini_batch_size, causal, dtype):
    """Without autograd the states go into one preallocated stack and the tail runs in place: same numbers."""
    q, k, v, lr = _inputs(seed=12, dtype=dtype)
    state = _state(kind, seed=13, dtype=dtype)
    kw = dict(mini_batch_size=mini_batch_size, causal=causal)
    inputs, leaves = _leaves(q, k, v, lr, state=state)
    tracked = ttt_scan_fused(kind, *inputs, leaves, **kw)
    assert tracked.requires_grad
    with torch.no_grad():
        untracked = ttt_scan_fused(kind, *inputs, leaves, **kw)
    with torch.inference_mode():
        inference = ttt_scan_fused(kind, q, k, v, lr, state, **kw)
    plain = ttt_scan_fused(kind, q, k, v, lr, state, **kw)  # grad mode on, nothing requires grad
    for other in (untracked, inference, plain):
        assert not other.requires_grad
        torch.testing.assert_close(other, tracked.detach(), rtol=0, atol=0)


def test_strided_inputs():
    """q, k, v as head views of token-major [B, N, h·d] tensors, lr as a view of [B, N, h]: same result."""
    q, k, v, lr = _inputs(seed=14)
    state = _state('linear', seed=15)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    assert not views[0].is_contiguous()
    lr_view = lr.transpose(1, 2).contiguous().transpose(1, 2)
    for size in (3, 4):
        torch.testing.assert_close(ttt_scan_fused('linear', *views, lr_view, state, mini_batch_size=size),
                                   ttt_scan_fused('linear', q, k, v, lr, state, mini_batch_size=size), rtol=0, atol=0)


@pytest.mark.parametrize('causal', [False, True])
def test_causality_rule(causal):
    """Perturbing token t changes no output before t's mini-batch (causally: none before t), and changes the rest."""
    q, k, v, lr = _inputs(seed=16, n=13)
    state = _state('linear', seed=17)
    base = ttt_scan_fused('linear', q, k, v, lr, state, mini_batch_size=4, causal=causal)
    for t in (0, 5, 6, 12):
        kp, vp = k.clone(), v.clone()
        kp[..., t, :] += 1.0
        vp[..., t, :] -= 1.0
        out = ttt_scan_fused('linear', q, kp, vp, lr, state, mini_batch_size=4, causal=causal)
        changed = (out - base).abs().amax(dim=(0, 1, 3)) > 1e-12
        first = t if causal else (t // 4) * 4
        assert not changed[:first].any() and changed[first:].all(), (t, changed)


def test_ln_l2_grad_parts():
    g = torch.Generator().manual_seed(18)
    z, target = (torch.randn(5, 7, 6, generator=g, dtype=torch.float64) for _ in range(2))
    w, b = 1 + torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    u, r = ln_l2_grad_parts(z, w * (b - target), w * w * 6 ** 0.5, 1e-6)
    assert r.shape == (5, 7, 1)
    torch.testing.assert_close(u * r * 6 ** 0.5, ln_l2_grad(z, target, w, b, 1e-6), rtol=1e-12, atol=1e-13)


def test_bad_arguments():
    q, k, v, lr = _inputs()
    with pytest.raises(ValueError, match="'linear' or 'mlp'"):
        ttt_scan_fused('rnn', q, k, v, lr, _state('linear'), mini_batch_size=4)
    with pytest.raises(ValueError, match='mini_batch_size'):
        ttt_scan_fused('linear', q, k, v, lr, _state('linear'), mini_batch_size=0)
    bad = {n: t.expand(B + 1, *t.shape) for n, t in _state('linear').items()}
    with pytest.raises(ValueError, match=r'\[h, \.\.\.\] or \[B=2, h, \.\.\.\]'):
        ttt_scan_fused('linear', q, k, v, lr, bad, mini_batch_size=4)
