"""Whole Vision-TTT models with the fused mini-batch scan (all scans of a mixer as one batched scan) against the same
weights on the composable per-scan path: outputs and every parameter's gradient."""
import pytest
import timm  # (tests/conftest.py imports vittt first: it registers the models and must come before timm)
import torch

from helpers import assert_fused_equals_composable, set_fused


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('size', [(64, 64), (48, 80), (33, 47)])   # 16, 15 and 9 tokens; mini-batch 5
@pytest.mark.parametrize('config', [
    dict(), dict(global_pool='token'), dict(mixer_kwargs=dict(inner='mlp', inner_mlp_ratio=2.0, share_state=True)),
    dict(mixer_kwargs=dict(causal=True, scans=('forward', 'reverse', 'column', 'column_reverse'), merge='concat')),
], ids=['defaults', 'cls_token', 'mlp_shared', 'causal_4scans_concat'])
def test_fused_equals_composable(config, size, dtype, images):
    torch.manual_seed(0)
    mixer_kwargs = dict(dict(mini_batch_size=5), **config.get('mixer_kwargs', {}))
    model = timm.create_model('vision_ttt_tiny', depth=2, embed_dim=32, num_heads=2, num_classes=7,
                              **dict(config, mixer_kwargs=mixer_kwargs)).to(dtype)
    x = images(2, *size).to(dtype)
    target = torch.randn(2, 7, dtype=dtype)
    assert set_fused(model, True) == 2
    # float32: the class token's gradient (|g| ≈ 21, summed over two scans of every block) carries ~1.4e-4 relative
    # rounding on *each* path (both measured against the float64 run), so the two may differ by up to ~3e-4
    assert_fused_equals_composable(model, x, target, rtol32=3e-4)
