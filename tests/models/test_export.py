"""Export and tracing with a dynamic batch size *and* resolution, for every family: ``torch.export`` programs equal
the eager model at other batch sizes and at other (non-square, not stride-divisible) sizes; ``torch.fx`` traces the
classification models forward and backward (timm's FX feature extraction, as in timm's ``test_model_*_fx``).

While a graph is captured the ops take shape-agnostic forms: pads always applied (with symbolic widths), no RoPE /
sin-cos cache keyed by the sizes, the SwiGLU / depth-wise inner models on their composable path (batched over heads,
no per-sample conv groups: ONNX's Conv has a static ``group``), Vision-TTT's mini-batch scan as one padded scan op.
The ONNX files themselves are checked in tests/tasks/export/test_export_cli.py."""
import pytest
import timm
import torch
from torch.export import Dim, export

SIZE = (48, 80)
MODELS = {
    'vit3_tiny': dict(depth=2, embed_dim=48, num_heads=2),
    'hvit3_tiny': dict(depths=(1, 1, 1), dims=(16, 32, 32), num_heads=(1, 2, 2)),          # stride 16
    'vision_ttt_tiny': dict(depth=2, embed_dim=32, num_heads=2, mixer_kwargs=dict(mini_batch_size=5)),
}
STRIDE = {'vit3_tiny': 16, 'hvit3_tiny': 16, 'vision_ttt_tiny': 16}
VISION_TTT_VARIANTS = {
    'causal_mlp_4scans_concat': dict(inner='mlp', causal=True, merge='concat',
                                     scans=('forward', 'reverse', 'column', 'column_reverse')),
    'causal_linear': dict(causal=True),
    'mlp_shared_state': dict(inner='mlp', share_state=True),
}


def _model(name, **overrides):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=7, **dict(MODELS[name], **overrides)).eval()


def _dynamic(lo, hi=256):
    return {'x': {0: Dim('batch', min=1, max=64), 2: Dim('height', min=lo, max=hi), 3: Dim('width', min=lo, max=hi)}}


def _shapes(lo):
    """batch 1 at the smallest sides, batch 3 non-square with sides not multiples of the stride, batch 2 larger"""
    return [(1, lo, lo), (3, lo + 5, 2 * lo + 3), (2, 97, 61)]


def _assert_program_equals_eager(program, model, lo, images):
    with torch.no_grad():
        for i, (b, h, w) in enumerate(_shapes(lo)):
            x = images(b, h, w, seed=i + 1)
            torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f'at {b}x3x{h}x{w}: {m}')


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(MODELS))
def test_torch_export_dynamic_batch_and_resolution_equals_eager(name, images):
    model = _model(name)
    lo = 2 * STRIDE[name]  # the coarsest grid at least 2 wide (torch.export specialises sizes that could be 1)
    program = export(model, (images(2, *SIZE),), dynamic_shapes=_dynamic(lo)).module()
    _assert_program_equals_eager(program, model, lo, images)


@pytest.mark.slow
@pytest.mark.parametrize('variant', sorted(VISION_TTT_VARIANTS))
def test_vision_ttt_scan_variants_export_with_dynamic_resolution(variant, images):
    """Every branch of the captured scan (TTT-Linear / TTT-MLP, causal, shared state, 4 orders): token counts below,
    at and above multiples of the mini-batch size (4, 12, 35 tokens with mini-batches of 5)."""
    mixer = dict(MODELS['vision_ttt_tiny']['mixer_kwargs'], **VISION_TTT_VARIANTS[variant])
    model = _model('vision_ttt_tiny', depth=1, mixer_kwargs=mixer)
    program = export(model, (images(2, *SIZE),), dynamic_shapes=_dynamic(32)).module()
    _assert_program_equals_eager(program, model, 32, images)


def test_exported_program_refuses_sizes_below_its_range(images):
    model = _model('vit3_tiny', depth=1)
    program = export(model, (images(2, *SIZE),), dynamic_shapes=_dynamic(32)).module()
    with pytest.raises(Exception, match='size'):
        program(images(1, 16, 40))


def _onnx_export(model, path, example):
    torch.onnx.export(model, (example,), str(path), dynamic_shapes={'x': {0: Dim('batch', min=1, max=64)}},
                      dynamo=True, verbose=False, optimize=False)


@pytest.mark.slow
def test_onnx_export_fails_with_batch_folding(tmp_path, dwconv_backend, images):
    """Why the batch-independent path exists: folded into conv groups, the batch would be an ONNX attribute."""
    pytest.importorskip('onnxruntime')
    dwconv_backend('grouped')
    with pytest.raises(Exception, match='conv2d'):
        _onnx_export(_model('vit3_tiny', depth=1), tmp_path / 'folded.onnx', images(2, *SIZE))


# --- torch.fx, the way timm's test_model_forward_fx / test_model_backward_fx trace a model

def _fx_model(model, train=False):
    from timm.layers import create_feature_extractor, get_graph_node_names

    train_nodes, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, [train_nodes[-1] if train else eval_nodes[-1]])


@pytest.mark.parametrize('name', sorted(MODELS))
def test_fx_trace_forward_equals_eager(name, images):
    model = _model(name)
    fx_model = _fx_model(model)
    x = images(2, 50, 67)
    with torch.no_grad():
        (out,) = fx_model(x).values()
        torch.testing.assert_close(out, model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_fx_trace_backward_reaches_every_parameter(name, images):
    model = _model(name).train()
    fx_model = _fx_model(model, train=True)
    (out,) = fx_model(images(2, 50, 67)).values()
    assert out.shape == (2, 7)
    out.mean().backward()
    missing = [n for n, p in fx_model.named_parameters() if p.grad is None]
    assert not missing, missing


def test_fx_trace_of_features_only_backbones(images):
    """timm's FX feature extractor (``feature_cls='fx'``) gives the eager feature maps (same seed, same weights)."""
    for name in ('vit3_tiny', 'hvit3_tiny'):
        nets = []
        for feature_cls in ('fx', 'getter'):
            torch.manual_seed(0)
            nets.append(timm.create_model(name, features_only=True, feature_cls=feature_cls, **MODELS[name]).eval())
        x = images(2, 50, 67)
        with torch.no_grad():
            fx_maps, maps = nets[0](x), nets[1](x)
        assert len(fx_maps) == len(maps) > 1
        for a, b in zip(fx_maps, maps):
            if a.ndim == 3:  # a plain model's block outputs are tokens [B, N, C] (as for timm's ViTs under FX)
                a = a.transpose(1, 2).reshape(b.shape)
            torch.testing.assert_close(a, b)
