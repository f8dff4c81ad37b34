"""gelu_linear (GELU recomputed in backward) against autograd's Linear(GELU(h)): values and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from vittt.layers import TokenMlp
from vittt.ops import gelu_linear


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('approximate', ['none', 'tanh'])
@pytest.mark.parametrize('bias', [True, False], ids=['bias', 'no-bias'])
def test_gelu_linear_equals_autograd(dtype, approximate, bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 7, 12, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(5, 12, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(5, generator=g, dtype=dtype, requires_grad=True) if bias else None
    ours = gelu_linear(h, w, b, approximate)
    ref = F.linear(F.gelu(h, approximate=approximate), w, b)
    torch.testing.assert_close(ours, ref)
    weights = torch.randn(ref.shape, generator=g, dtype=dtype)
    inputs = (h, w) + ((b,) if bias else ())
    for a, r in zip(torch.autograd.grad((ours * weights).sum(), inputs),
                    torch.autograd.grad((ref * weights).sum(), inputs)):
        torch.testing.assert_close(a, r)


def test_gelu_linear_gradcheck():
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((3, 4), (2, 4), (2,))]
    assert torch.autograd.gradcheck(gelu_linear, args)


def test_gelu_linear_keeps_only_the_pre_activation():
    """The point of the function: autograd holds h and the weight, not GELU(h)."""
    h = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(3, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gelu_linear(h * 1.0, w)
    assert sorted(tuple(t.shape) for t in saved) == [(3, 8), (4, 8)]


def test_gelu_linear_shape_error():
    with pytest.raises(ValueError, match='h has 4 features but weight expects 5'):
        gelu_linear(torch.randn(2, 4), torch.randn(3, 5))


@pytest.mark.parametrize('dwconv', [False, True], ids=['mlp', 'dwconv-mlp'])
def test_token_mlp_gradients_match_the_plain_composition(dwconv):
    torch.manual_seed(0)
    mlp = TokenMlp(6, 10, dwconv=dwconv).double()
    x = torch.randn(2, 12, 6, dtype=torch.float64, requires_grad=True)

    def plain(x):
        a = F.gelu(mlp.fc1(x))
        if dwconv:
            a = F.gelu(a + mlp.dwc(a.transpose(1, 2).reshape(2, 10, 3, 4)).flatten(2).transpose(1, 2))
        return mlp.fc2(a)

    ours, ref = mlp(x, (3, 4)), plain(x)
    torch.testing.assert_close(ours, ref)
    params = (x,) + tuple(mlp.parameters())
    for a, r in zip(torch.autograd.grad(ours.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(a, r)


def test_gelu_linear_under_autocast_matches_autograd():
    """bf16 autocast: the matmuls run in bf16 in both; gradients come back in the parameters' dtype."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(4, 8, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)
    results = []
    for fn in (gelu_linear, lambda h, w, b: F.linear(F.gelu(h), w, b)):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = fn(h * 1.0, w, b)
        grads = torch.autograd.grad(out.float().square().sum(), (h, w, b))
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    for a, r in zip(grads, ref_grads):
        assert a.dtype == r.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)
