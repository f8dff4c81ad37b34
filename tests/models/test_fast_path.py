"""Whole models on the fast path against the same weights on the composable (reference-style) path, the
memory-lean inference mode against the default mode, and torch.compile of the fast path."""
import pytest
import timm
import torch

from vittt.layers import set_memory_lean

from helpers import assert_fused_equals_composable

SMALL = {
    'vit3_tiny': dict(depth=2, embed_dim=48, num_heads=2),
    'hvit3_tiny': dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), num_heads=(1, 2, 2, 2)),
}


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('size', [(64, 64), (48, 80), (33, 47)])
@pytest.mark.parametrize('name', sorted(SMALL))
def test_fast_path_equals_reference_path(name, size, dtype, images):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **SMALL[name]).to(dtype)
    x = images(2, *size).to(dtype)
    target = torch.randn(2, 7, dtype=dtype)
    assert_fused_equals_composable(model, x, target)


@pytest.mark.parametrize('chunk_tokens', [1, 7, 64, 10_000])
@pytest.mark.parametrize('size', [(64, 64), (48, 80), (33, 47)])
@pytest.mark.parametrize('name', sorted(SMALL))
def test_memory_lean_equals_default(name, size, chunk_tokens, images):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, **SMALL[name]).eval()
    x = images(2, *size)
    with torch.inference_mode():
        default = model(x)
        assert set_memory_lean(model, True, chunk_tokens=chunk_tokens) == len(model_blocks(model))
        lean = model(x)
        lean_features = model.forward_intermediates(x, intermediates_only=True)
        set_memory_lean(model, False)
        default_features = model.forward_intermediates(x, intermediates_only=True)
    torch.testing.assert_close(lean, default, rtol=1e-5, atol=1e-5)
    for a, b in zip(lean_features, default_features):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('inner_loss', ['mse', 'dot'])
def test_memory_lean_with_other_settings(inner_loss, images):
    """Inner loss that needs the prediction, no gradient normalisation, another lr, float64."""
    torch.manual_seed(0)
    model = timm.create_model('vit3_tiny', depth=2, embed_dim=32, num_heads=2, num_classes=5,
                              ttt_kwargs=dict(inner_loss=inner_loss, grad_norm=False, inner_lr=0.5)).double().eval()
    x = images(1, 50, 70).double()
    with torch.no_grad():
        default = model(x)
        set_memory_lean(model, True, chunk_tokens=5)
        torch.testing.assert_close(model(x), default, rtol=1e-10, atol=1e-12)


def test_memory_lean_is_inference_only(images):
    """With autograd on, lean blocks run the default path, so training is unaffected (gradients exist)."""
    model = timm.create_model('vit3_tiny', **SMALL['vit3_tiny'])
    set_memory_lean(model, True, chunk_tokens=4)
    model(images(1, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_set_memory_lean_errors_and_counts():
    assert set_memory_lean(timm.create_model('deit_tiny_patch16_224', depth=1), True) == 0
    with pytest.raises(ValueError, match='chunk_tokens must be a positive'):
        set_memory_lean(timm.create_model('vit3_tiny', depth=1), True, chunk_tokens=0)


def model_blocks(model):
    return [m for m in model.modules() if hasattr(m, 'memory_lean')]


@pytest.mark.slow
def test_compile_fullgraph_fast_path(images, run_with_grads):
    """torch.compile(fullgraph=True) traces the fused inner step (forward and hand-written backward) with no graph
    break, and matches eager outputs and parameter gradients."""
    torch._dynamo.reset()  # static shapes: earlier tests may have compiled these blocks at other sizes
    torch.manual_seed(0)
    model = timm.create_model('vit3_tiny', depth=1, embed_dim=32, num_heads=2, num_classes=5)
    x, target = images(2, 48, 64), torch.randn(2, 5)
    eager_out, eager_grads = run_with_grads(model, x, target)
    compiled = torch.compile(model, fullgraph=True)
    out, grads = run_with_grads(model, x, target, call=compiled)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    for key in eager_grads:
        torch.testing.assert_close(grads[key], eager_grads[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('chunk_tokens', [3, 1024])
@pytest.mark.parametrize('name', sorted(SMALL))
def test_inference_path_equals_autograd_path(name, chunk_tokens, images):
    """Without autograd the blocks run the MLP in token bands and form residual sums in place: same numbers as the
    forward that records a graph (drop-path set but inactive in eval)."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7, drop_path_rate=0.2, **SMALL[name]).eval()
    set_memory_lean(model, False, chunk_tokens=chunk_tokens)
    x = images(2, 40, 72)
    with_graph = model(x)
    with torch.no_grad():
        without = model(x)
    torch.testing.assert_close(without, with_graph.detach(), rtol=1e-6, atol=1e-6)
