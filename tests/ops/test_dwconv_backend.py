"""The ways of running per-sample depth-wise convolutions (batch folded into conv groups, windowed products for
small maps; batch-independent shifted products) give the same numbers, including the memory-lean mode's row bands,
and the switch's errors."""
import pytest
import torch

import vittt.ops
from vittt.ops import DWCONV_BACKENDS, dwconv_inner_grad, dwconv_per_sample, get_dwconv_backend
from vittt.ops.dwconv.reference import shifted_dwconv


def _run_both(fn, dwconv_backend):
    dwconv_backend('grouped')
    grouped = fn()
    dwconv_backend('shifted')
    return grouped, fn()


@pytest.mark.parametrize('shape,ks', [((1, 3, 5, 7), 3), ((3, 4, 6, 6), 3), ((2, 2, 1, 4), 3), ((2, 5, 9, 8), 5)])
@pytest.mark.parametrize('padding', [None, (0, 'p')], ids=['whole-map', 'band'])
def test_shifted_equals_grouped(shape, ks, padding, dwconv_backend):
    b, c, h, w = shape
    g = torch.Generator().manual_seed(h * w + ks)
    p = ks // 2
    pad = None if padding is None else (0, p)
    rows = h if padding is None else h + 2 * p          # a band passes p context rows above and below
    x = torch.randn(b, c, rows, w, generator=g, dtype=torch.float64)
    e = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    weight = torch.randn(b, c, ks, ks, generator=g, dtype=torch.float64)
    out_g, out_s = _run_both(lambda: dwconv_per_sample(x, weight, padding=pad), dwconv_backend)
    assert out_s.shape == out_g.shape == (b, c, h, w)
    torch.testing.assert_close(out_s, out_g, rtol=1e-12, atol=1e-12)
    grad_g, grad_s = _run_both(lambda: dwconv_inner_grad(x, e, ks, padding=pad), dwconv_backend)
    assert grad_s.shape == grad_g.shape == (b, c, ks, ks)
    torch.testing.assert_close(grad_s, grad_g, rtol=1e-12, atol=1e-12)
    if padding is None:  # and both against the plain reference
        torch.testing.assert_close(out_s, shifted_dwconv(x, weight), rtol=1e-12, atol=1e-12)


def test_shifted_backward_equals_grouped(dwconv_backend):
    """Autograd through the shifted products (the composable path's backward) = through the grouped convs."""
    g = torch.Generator().manual_seed(5)
    x, e = (torch.randn(3, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)

    def grads():
        loss = (dwconv_per_sample(x, weight) ** 2).sum() + (dwconv_inner_grad(x, e, 3) ** 2).sum()
        return torch.autograd.grad(loss, (x, e, weight))

    for a, b in zip(*_run_both(grads, dwconv_backend)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_backend_switch():
    assert DWCONV_BACKENDS == ('auto', 'grouped', 'shifted')
    assert get_dwconv_backend() == 'auto'
    with vittt.ops.dwconv_backend('shifted') as name:
        assert name == get_dwconv_backend() == 'shifted'
        with pytest.raises(ValueError, match=r"dwconv backend must be one of .*got 'im2col'"):
            with vittt.ops.dwconv_backend('im2col'):
                pass
        assert get_dwconv_backend() == 'shifted'  # a refused name changes nothing
    assert get_dwconv_backend() == 'auto'
    assert not hasattr(vittt.ops, 'set_dwconv_backend')  # the process-global switch is gone


def test_fixture_switches_for_the_test(dwconv_backend):
    """tests/conftest.py's fixture: each call holds for the rest of the test (teardown leaves them all)."""
    dwconv_backend('grouped')
    assert get_dwconv_backend() == 'grouped'
    dwconv_backend('shifted')
    assert get_dwconv_backend() == 'shifted'


@pytest.mark.parametrize('shape,ks', [((1, 3, 5, 7), 3), ((3, 4, 6, 6), 3), ((2, 2, 1, 4), 3), ((2, 5, 9, 8), 5)])
@pytest.mark.parametrize('padding', [None, (0, 'p')], ids=['whole-map', 'band'])
@pytest.mark.parametrize('token_major', [True, False], ids=['tokens', 'nchw'])
@pytest.mark.parametrize('op', ['gradient', 'apply'])
def test_windowed_equals_convolution(monkeypatch, shape, ks, padding, token_major, op, dwconv_backend):
    """The grouped backend's form for small maps without autograd (strided windows of the padded map, one product,
    one sum) equals the grouped convolution, for the kernel gradient and the per-sample kernel's application, whole
    map and band (the band's context rows), on the mixer's token-major views and on NCHW maps. It runs up to its
    size limit and not above, never under autograd, a dispatch mode (FLOP counting) or symbolic shapes (export,
    compile)."""
    import vittt.ops.dwconv.composable as composable
    dwconv_backend('grouped')
    b, c, h, w = shape
    g = torch.Generator().manual_seed(h * w + ks)
    p = ks // 2
    pad = None if padding is None else (0, p)
    rows = h if padding is None else h + 2 * p
    if token_major:
        x = torch.randn(b, rows, w, 2 * c + 1, generator=g, dtype=torch.float64)[..., 1:c + 1].permute(0, 3, 1, 2)
    else:
        x = torch.randn(b, c, rows, w, generator=g, dtype=torch.float64)
    other = torch.randn(*((b, c, h, w) if op == 'gradient' else (b, c, ks, ks)), generator=g, dtype=torch.float64)
    fn, windowed_name, limit = ((dwconv_inner_grad, '_windowed_inner_grad', 'WINDOWED_ELEMENTS') if op == 'gradient'
                                else (dwconv_per_sample, '_windowed_per_sample', 'WINDOWED_APPLY_ELEMENTS'))
    run = (lambda: fn(x, other, ks, padding=pad)) if op == 'gradient' else (lambda: fn(x, other, padding=pad))
    calls = []
    windowed = getattr(composable, windowed_name)
    monkeypatch.setattr(composable, windowed_name, lambda *a: calls.append(1) or windowed(*a))
    monkeypatch.setattr(composable, limit, x.numel() - 1)
    convolution = run()
    assert not calls
    monkeypatch.setattr(composable, limit, x.numel())
    out = run()
    assert calls and out.shape == convolution.shape == ((b, c, ks, ks) if op == 'gradient' else (b, c, h, w))
    torch.testing.assert_close(out, convolution, rtol=1e-12, atol=1e-12)
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False):                               # counted as the convolution it is
        run()
    monkeypatch.setattr(composable, 'symbolic_shapes', lambda: True)   # captured / compiled: no size branch
    run()
    assert len(calls) == 1
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(composable, windowed_name, lambda *a: calls.append(1) or windowed(*a))
    monkeypatch.setattr(composable, limit, x.numel())
    with torch.enable_grad():     # under autograd (the composable path's backward) the convolution
        x.requires_grad_()
        run()
    assert not calls
