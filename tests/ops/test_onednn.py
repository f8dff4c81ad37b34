"""oneDNN post-op fusions (``vittt.ops.onednn``): the fused linear / convolution equal the eager layer followed by
its activation; the fallback runs where the fused ops do not apply; the identity folded into a depth-wise kernel
equals the residual sum."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vittt.ops import onednn

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason='PyTorch built without oneDNN')

EAGER = {'gelu': F.gelu, 'relu': F.relu, 'silu': F.silu, None: lambda t: t}


def _gelu_tanh(t):
    return F.gelu(t, approximate='tanh')


@needs_onednn
@pytest.mark.parametrize('act,approximate', [('gelu', 'none'), ('gelu', 'tanh'), ('relu', 'none'), ('silu', 'none'),
                                              (None, 'none')])
@pytest.mark.parametrize('bias', [True, False])
def test_linear_act_equals_eager(act, approximate, bias):
    torch.manual_seed(0)
    x, w = torch.randn(3, 7, 24), torch.randn(40, 24) / 5
    b = torch.randn(40) if bias else None
    act_fn = _gelu_tanh if approximate == 'tanh' else EAGER[act]
    ref = act_fn(F.linear(x, w, b))
    calls = []
    with torch.no_grad(), _counting(calls, '_linear_pointwise'):
        out = onednn.linear_act(x, w, b, act, approximate)
    assert calls, 'the fused op did not run'
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize('bias', [True, False])
def test_linear_mul_equals_eager(bias):
    torch.manual_seed(0)
    x, w = torch.randn(2, 9, 16), torch.randn(24, 16) / 4
    b, other = (torch.randn(24) if bias else None), torch.randn(2, 9, 24)
    calls = []
    with torch.no_grad(), _counting(calls, '_linear_pointwise'):
        out = onednn.linear_mul(x, w, b, other)
        strided = onednn.linear_mul(x, w, b, other.transpose(0, 1).contiguous().transpose(0, 1))  # unfused
    assert len(calls) == 1
    torch.testing.assert_close(out, F.linear(x, w, b) * other, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(strided, F.linear(x, w, b) * other, atol=1e-5, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize('act', ['gelu', 'relu', None])
@pytest.mark.parametrize('stride,padding,groups', [(1, 1, 1), (2, 1, 1), (1, 1, 16), (2, 0, 16), (1, 0, 1)])
@pytest.mark.parametrize('channels_last', [True, False])
def test_conv_act_equals_eager(act, stride, padding, groups, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 11)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(32, 16 // groups, 3, 3) / 4, torch.randn(32)
    ref = EAGER[act](F.conv2d(x, w, b, stride, padding, 1, groups))
    calls = []
    with torch.no_grad(), _counting(calls, '_convolution_pointwise'):
        out = onednn.conv_act(x, w, b, (stride, stride), (padding, padding), (1, 1), groups, act)
    assert calls, 'the fused op did not run'
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == ref.is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize('case', ['autograd', 'float64', 'disabled', 'meta', 'flop counter', 'autocast'])
def test_fallback_where_fusion_does_not_apply(case):
    """With autograd, in float64, with oneDNN disabled, off the CPU, under a dispatch mode (the MAC counter knows
    the plain ops) or under autocast (which sets the ops' dtype): the eager layer and activation, exactly."""
    torch.manual_seed(0)
    dtype = torch.float64 if case == 'float64' else torch.float32
    device = 'meta' if case == 'meta' else 'cpu'
    x = torch.randn(2, 5, 8, dtype=dtype, device=device, requires_grad=case == 'autograd')
    w, b = torch.randn(6, 8, dtype=dtype, device=device), torch.randn(6, dtype=dtype, device=device)
    m = torch.randn(2, 8, 5, 5, dtype=dtype, device=device)
    k = torch.randn(8, 1, 3, 3, dtype=dtype, device=device)
    calls = []
    counter = FlopCounterMode(display=False) if case == 'flop counter' else contextlib.nullcontext()
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=case == 'autocast')
    with torch.set_grad_enabled(case == 'autograd'), torch.backends.mkldnn.flags(enabled=case != 'disabled'), \
            _counting(calls, '_linear_pointwise'), _counting(calls, '_convolution_pointwise'), counter, autocast:
        assert not onednn.post_ops_apply(x, w, b)
        out = onednn.linear_act(x, w, b, 'gelu')
        conv = onednn.conv_act(m, k, None, (1, 1), (1, 1), (1, 1), 8, 'relu')
        refs = F.gelu(F.linear(x, w, b)), F.relu(F.conv2d(m, k, None, 1, 1, 1, 8))
    assert not calls
    if case == 'flop counter':
        # the fused calls and the references, counted alike: 2 FLOPs a multiply-add
        assert counter.get_total_flops() == 2 * 2 * (2 * 5 * 8 * 6 + 2 * 8 * 25 * 9)
    if case == 'meta':
        assert out.shape == (2, 5, 6) and conv.shape == (2, 8, 5, 5)
        return
    torch.testing.assert_close(out, refs[0], atol=0, rtol=0)
    torch.testing.assert_close(conv, refs[1], atol=0, rtol=0)
    if case == 'autograd':
        out.sum().backward()
        assert x.grad is not None


def test_conv_act_padding_string():
    torch.manual_seed(0)
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 1, 3, 3)
    with torch.no_grad():
        out = onednn.conv_act(x, w, None, (1, 1), 'same', (1, 1), 4, 'relu')
    torch.testing.assert_close(out, F.relu(F.conv2d(x, w, None, 1, 'same', 1, 4)))


@pytest.mark.parametrize('kernel', [3, 5])
def test_identity_folded_is_the_residual(kernel):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    w = torch.randn(6, 1, kernel, kernel, dtype=torch.float64)
    before = w.clone()
    folded = onednn.identity_folded(w)
    torch.testing.assert_close(F.conv2d(x, folded, None, 1, kernel // 2, 1, 6),
                               x + F.conv2d(x, w, None, 1, kernel // 2, 1, 6))
    assert torch.equal(w, before)  # the module's kernel is left alone


@pytest.mark.parametrize('shape', [(6, 2, 3, 3), (6, 1, 2, 2)])
def test_identity_folded_rejects_other_kernels(shape):
    with pytest.raises(ValueError, match=r'depth-wise kernel \[C, 1, k, k\] with odd k'):
        onednn.identity_folded(torch.zeros(shape))


class _counting:
    """Counts the calls of one ``torch.ops.mkldnn`` op (any overload) while active."""

    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def __enter__(self):
        self.op = getattr(torch.ops.mkldnn, self.name)
        calls, op = self.calls, self.op

        class Wrapper:
            def __call__(self, *args, **kwargs):
                calls.append(self)
                return op(*args, **kwargs)

            def __getattr__(self, attr):  # an overload such as .binary, counted too
                overload = getattr(op, attr)

                def call(*args, **kwargs):
                    calls.append(attr)
                    return overload(*args, **kwargs)
                return call
        setattr(torch.ops.mkldnn, self.name, Wrapper())
        return self

    def __exit__(self, *exc):
        setattr(torch.ops.mkldnn, self.name, self.op)


@needs_onednn
@pytest.mark.parametrize('layout', ['channels_last rows', 'nchw rows', 'nchw columns'])
def test_fused_ops_read_strided_views(layout):
    """Bands of rows (and of columns) of a map are strided views; the fused ops read them as F.conv2d does."""
    torch.manual_seed(0)
    m = torch.randn(2, 8, 12, 10)
    if layout.startswith('channels_last'):
        m = m.contiguous(memory_format=torch.channels_last)
    x = m[:, :, 3:9] if layout.endswith('rows') else m[..., 2:7]
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 8, 3, 3) / 4, torch.randn(16)
    with torch.no_grad():
        out = onednn.conv_act(x, w, b, (1, 1), (1, 1), (1, 1), 1, 'relu')
        tokens = m.flatten(2).transpose(1, 2)[:, 5:40]            # [B, N, C] rows of a token view
        lin = onednn.linear_act(tokens[..., 1:7], w[:6, :6, 0, 0], None, 'gelu')
    torch.testing.assert_close(out, F.relu(F.conv2d(x, w, b, 1, 1)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin, F.gelu(F.linear(tokens[..., 1:7], w[:6, :6, 0, 0])), atol=1e-5, rtol=1e-5)


def _big_linear(out_features=64):
    """A linear layer and an input whose output is above LINEAR_BIAS_PASS_ELEMENTS (the oneDNN path's size)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, out_features)
    rows = onednn.LINEAR_BIAS_PASS_ELEMENTS // out_features + 5
    return layer, torch.randn(1, rows, 32)


@needs_onednn
@pytest.mark.parametrize('act', [None, 'gelu', 'relu'])
def test_linear_layer_equals_the_module(act):
    layer, x = _big_linear()
    small = x[:, :7]                      # a small output without activation stays with F.linear
    calls = []
    with torch.no_grad(), _counting(calls, '_linear_pointwise'):
        out = onednn.linear_layer(layer, x, act)
        assert len(calls) == 1, 'the oneDNN matmul did not run'
        out_small = onednn.linear_layer(layer, small, act)
    assert len(calls) == (1 if act is None else 2)
    torch.testing.assert_close(out, EAGER[act](layer(x)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_small, EAGER[act](layer(small)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('case', ['own hook', 'pre hook', 'global hook', 'subclass', 'autograd'])
def test_linear_layer_keeps_what_the_module_does(case):
    """Hooks see the call, a subclass's forward runs, autograd differentiates the module: no weight-level shortcut."""
    layer, x = _big_linear()
    seen, handles = [], []

    class Scaled(torch.nn.Linear):
        def forward(self, inp):
            seen.append('forward')
            return super().forward(inp) * 2

    if case == 'subclass':
        scaled = Scaled(32, 64)
        scaled.load_state_dict(layer.state_dict())
        layer, expected = scaled, lambda t: F.gelu(F.linear(t, scaled.weight, scaled.bias) * 2)
    else:
        expected = lambda t: F.gelu(F.linear(t, layer.weight, layer.bias))
    if case == 'own hook':
        handles.append(layer.register_forward_hook(lambda m, i, o: seen.append('hook')))
    elif case == 'pre hook':
        handles.append(layer.register_forward_pre_hook(lambda m, i: seen.append('hook')))
    elif case == 'global hook':
        handles.append(torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append('hook')))
    try:
        if case == 'autograd':
            x.requires_grad_(True)
            out = onednn.linear_layer(layer, x, 'gelu')
            out.square().sum().backward()
            grad, x.grad = x.grad, None
            expected(x).square().sum().backward()
            torch.testing.assert_close(grad, x.grad)
        else:
            assert not onednn.plain_linear(layer)
            with torch.no_grad():
                out = onednn.linear_layer(layer, x, 'gelu')
            assert seen, 'the module was bypassed'
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out.detach(), expected(x).detach(), atol=1e-5, rtol=1e-5)
    assert onednn.plain_linear(torch.nn.Linear(2, 2))
