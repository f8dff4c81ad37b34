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
    (dict(mini_batch_size=0), 'mini_batch_size'), (dict(mini_batch_size=4.5), 'integer'), (dict(qk_conv_kernel=4), 'odd'), (dict(inner='rnn'), "'linear'"),
])
def test_bad_switches(kw, message):
    kw.setdefault('mini_batch_size', 4)
    with pytest.raises(ValueError, match=message):
        VisionTTTMixer(16, 2, **kw)
