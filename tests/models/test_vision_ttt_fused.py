"""Whole Vision-TTT models with the fused mini-batch scan (all scans of a mixer as one batched scan) against the same
weights on the composable per-scan path: outputs and every parameter's gradient."""
import pytest
import timm  # (tests/conftest.py imports vittt first: it registers the models and must come before timm)
import torch

from vittt.layers import VisionTTTMixer
from helpers import images


def _set_fused(model, fused):
    mixers = [m for m in model.modules() if isinstance(m, VisionTTTMixer)]
    for m in mixers:
        m.fused = fused
    return len(mixers)


def _run(model, x, target):
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * target).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('size', [(64, 64), (48, 80), (33, 47)])   # 16, 15 and 9 tokens; mini-batch 5
@pytest.mark.parametrize('config', [
    dict(), dict(global_pool='token'), dict(mixer_kwargs=dict(inner='mlp', inner_mlp_ratio=2.0, share_state=True)),
    dict(mixer_kwargs=dict(causal=True, scans=('forward', 'reverse', 'column', 'column_reverse'), merge='concat')),
], ids=['defaults', 'cls_token', 'mlp_shared', 'causal_4scans_concat'])
def test_fused_equals_composable(config, size, dtype):
    torch.manual_seed(0)
    mixer_kwargs = dict(dict(mini_batch_size=5), **config.get('mixer_kwargs', {}))
    model = timm.create_model('vision_ttt_tiny', depth=2, embed_dim=32, num_heads=2, num_classes=7,
                              **dict(config, mixer_kwargs=mixer_kwargs)).to(dtype)
    x = images(2, *size).to(dtype)
    target = torch.randn(2, 7, dtype=dtype)
    assert _set_fused(model, True) == 2
    fast_out, fast_grads = _run(model, x, target)
    _set_fused(model, False)
    ref_out, ref_grads = _run(model, x, target)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_out, ref_out, **tol)
    assert fast_grads.keys() == ref_grads.keys() and len(fast_grads) == len(list(model.parameters()))
    for key in ref_grads:
        torch.testing.assert_close(fast_grads[key], ref_grads[key], **tol, msg=lambda m: f'{key}: {m}')
