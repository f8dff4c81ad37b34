"""The Vision-TTT mixer: scan orders mean what they say, one direction is causal by mini-batch, two see everything."""
import copy

import pytest
import torch

from vittt.layers import VisionTTTMixer

GRID = (3, 5)
N = GRID[0] * GRID[1]


def _mixer(**kw):
    torch.manual_seed(0)
    m = VisionTTTMixer(16, 2, mini_batch_size=4, **kw).double()
    with torch.no_grad():  # non-trivial inner states and norms, so every path matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def _x(seed=1, n=N):
    return torch.randn(2, n, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _with_scans(m, scans):
    out = copy.deepcopy(m)
    out.scans = scans
    return out


def test_reverse_scan_is_forward_scan_of_reversed_tokens():
    fwd = _mixer(scans=('forward',), qk_conv_kernel=0)
    rev = _with_scans(fwd, ('reverse',))
    x = _x()
    torch.testing.assert_close(rev(x, GRID), fwd(x.flip(1), GRID).flip(1), rtol=1e-12, atol=1e-12)


def test_column_scan_is_forward_scan_of_transposed_grid():
    fwd = _mixer(scans=('forward',), qk_conv_kernel=0)
    col = _with_scans(fwd, ('column',))
    x = _x(2)
    t = lambda y, g: y.reshape(2, g[0], g[1], 16).transpose(1, 2).reshape(2, N, 16)
    torch.testing.assert_close(col(x, GRID), t(fwd(t(x, GRID), GRID[::-1]), GRID[::-1]), rtol=1e-12, atol=1e-12)


def _dependence(m, x, t, num_prefix=0):
    """Which outputs change when token t changes."""
    y = x.clone()
    y[:, t] += 1.0
    return ((m(y, GRID, num_prefix) - m(x, GRID, num_prefix)).abs().amax(dim=(0, 2)) > 1e-10)


def test_single_direction_is_causal_by_mini_batch():
    m = _mixer(scans=('forward',), qk_conv_kernel=0)
    x = _x(3)
    for t in (0, 5, 9, 14):
        changed = _dependence(m, x, t)
        first = (t // 4) * 4
        assert not changed[:first].any() and changed[first:].all(), (t, changed)


def test_two_directions_see_every_token():
    m = _mixer()  # defaults: forward + reverse, with the Q/K convolutions
    x = _x(4)
    for t in range(N):
        assert _dependence(m, x, t).all(), t


def test_class_token_reads_the_whole_sequence_in_every_scan():
    m = _mixer(scans=('forward',), qk_conv_kernel=0)
    x = _x(5, n=N + 1)  # token 0 is a class token
    for t in (1, 8, N):
        assert _dependence(m, x, t, num_prefix=1)[0], t


def test_share_state_and_merge_switches():
    shared = _mixer(share_state=True)
    assert len(shared.states) == 1 and len(_mixer().states) == 2
    concat = _mixer(merge='concat')
    assert concat.merge_proj.in_features == 32
    x = _x(6)
    mean, total = _mixer(merge='mean'), _mixer(merge='sum')
    mean.post_norm, total.post_norm = torch.nn.Identity(), torch.nn.Identity()  # compare the merges before the norm
    torch.testing.assert_close(2 * (mean(x, GRID) - mean.proj.bias), total(x, GRID) - total.proj.bias)


@pytest.mark.parametrize('kw,message', [
    (dict(scans=('diagonal',)), 'scans'), (dict(scans=()), 'scans'), (dict(merge='max'), 'merge'),
    (dict(mini_batch_size=0), 'mini_batch_size'), (dict(mini_batch_size=4.5), 'integer'),
    (dict(qk_conv_kernel=4), 'odd'), (dict(inner='rnn'), "'linear'"),
])
def test_bad_switches(kw, message):
    kw.setdefault('mini_batch_size', 4)
    with pytest.raises(ValueError, match=message):
        VisionTTTMixer(16, 2, **kw)


# --------------------------------------------------------------------------- fused (one batched scan) == composable


def _fused_and_composable(m, x, grid, num_prefix):
    """Output, input gradient and every parameter's gradient with fused=True, then fused=False (same weights)."""
    runs = []
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
    for fused in (True, False):
        m.fused = fused
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = m(xi, grid, num_prefix)
        (out * probe).sum().backward()
        runs.append((out.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    return runs


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('kw', [
    dict(), dict(scans=('forward', 'reverse', 'column', 'column_reverse')), dict(scans=('column', 'forward')),
    dict(scans=('reverse',)), dict(share_state=True), dict(merge='concat'), dict(merge='mean'),
    dict(inner='mlp', inner_mlp_ratio=2.0), dict(causal=True), dict(inner='mlp', causal=True, share_state=True),
    dict(learnable_lr=False, share_qk=False, qk_conv_kernel=0, gate=False), dict(mini_batch_size=64),
    dict(mini_batch_size=1),
], ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items()) or 'defaults')
@pytest.mark.parametrize('grid,num_prefix', [((5, 7), 0), ((5, 7), 1), ((4, 4), 0)], ids=['5x7', '5x7+cls', '4x4'])
def test_fused_equals_composable(kw, grid, num_prefix, dtype):
    """All scans as one batched scan (fused=True) == one composable scan per scan order (fused=False): outputs and
    all input and parameter gradients (35 and 36 tokens: last mini-batches of 3 and 4; 16 tokens: 4 whole ones)."""
    torch.manual_seed(0)
    m = VisionTTTMixer(16, 2, **dict(dict(mini_batch_size=4), **kw)).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, num_prefix + grid[0] * grid[1], 16, generator=torch.Generator().manual_seed(1), dtype=dtype)
    (out, x_grad, grads), (ref, ref_x_grad, ref_grads) = _fused_and_composable(m, x, grid, num_prefix)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(x_grad, ref_x_grad, **tol)
    assert grads.keys() == ref_grads.keys() and all(g is not None for g in grads.values())
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=lambda msg: f'{name}: {msg}')
    m.fused = True
    with torch.inference_mode():  # the fused scan's no-autograd path: the same numbers
        torch.testing.assert_close(m(x, grid, num_prefix), out, rtol=0, atol=0)


def test_fused_switch(monkeypatch):
    """A class attribute (default on), overridable per instance; fused=False never calls the fused scan."""
    import vittt.layers.vision_ttt as module
    assert VisionTTTMixer.fused is True
    m = _mixer()
    assert m.fused
    calls = []
    original = module.ttt_scan_fused
    monkeypatch.setattr(module, 'ttt_scan_fused', lambda *a, **kw: (calls.append(1), original(*a, **kw))[1])
    x = _x(8)
    fused = m(x, GRID)
    assert len(calls) == 1  # both scans in one call
    m.fused = False
    torch.testing.assert_close(m(x, GRID), fused, rtol=1e-12, atol=1e-12)
    assert len(calls) == 1 and VisionTTTMixer.fused is True
