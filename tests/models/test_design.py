"""vit3_design_small and the design-space switches on any ViT³-family model: every combination builds, trains,
runs at any resolution; the ViT³ defaults are today's path exactly."""
import pytest
import timm
import torch

import vittt  # noqa: F401
from vittt.layers import SwiGLUInner, TokenInner, TTTMixer

SMALL = dict(embed_dim=48, depth=1, num_heads=2, num_classes=5)   # head width 24
COMBOS = [
    {}, dict(inner_model='fc'), dict(inner_model='silu_fc'), dict(inner_model='swiglu', inner_ratio=2),
    dict(inner_model='glu'), dict(inner_model='conv3x3'), dict(inner_model='dwconv3x3'),
    dict(inner_ratio=3), dict(inner_depth=3), dict(inner_residual='add'), dict(inner_residual='identity_w2'),
    dict(inner_residual='init_identity'), dict(inner_loss='mse'), dict(inner_loss='rmse'), dict(inner_loss='mae'),
    dict(inner_loss='smooth_l1'), dict(inner_epochs=2), dict(inner_epochs=3, inner_loss='mse'),
    dict(inner_batches=3), dict(inner_batches=2, inner_epochs=2, inner_model='conv3x3'), dict(inner_lr=0.5),
    dict(inner_lr='dynamic'), dict(inner_lr='dynamic', inner_batches=2, inner_model='swiglu'),
    dict(inner_model='dwconv3x3', inner_epochs=2, inner_loss='mse'), dict(conv_head=True, inner_model='fc'),
]


@pytest.mark.parametrize('switches', COMBOS, ids=[','.join(f'{k}={v}' for k, v in c.items()) or 'base'
                                                   for c in COMBOS])
def test_every_combination_builds_trains_and_runs_at_any_resolution(switches):
    torch.manual_seed(0)
    model = timm.create_model('vit3_design_small', **SMALL, **switches)
    for size in ((48, 64), (33, 50)):
        x = torch.randn(2, 3, *size)
        out = model(x)
        assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    heads = [m.inner[0] for m in model.modules() if isinstance(m, TTTMixer)]
    assert heads and all(isinstance(m, TokenInner) and m.fn.name == switches.get('inner_model', 'mlp') for m in heads)
    with torch.no_grad():   # the W0s get outer gradient
        assert any(p.grad.abs().max() > 0 for n, p in model.named_parameters() if '.attn.inner.0.' in n)


def test_the_design_base_layout():
    model = timm.create_model('vit3_design_small')
    mixer = model.blocks[0].attn
    assert model.embed_dim == 384 and len(model.blocks) == 12 and len(mixer.inner) == 1
    inner = mixer.inner[0]
    assert inner.fn.name == 'mlp' and inner.fn.depth == 2 and inner.fn.ratio == 1 and inner.head_dim == 64
    assert inner.loss.name == 'dot' and inner.epochs == inner.batches == 1 and inner.inner_lr == 1.0
    assert mixer.qkv.out_features == 3 * 384 and mixer.proj.in_features == 384
    assert dict(inner.named_parameters()).keys() == {'w1', 'w2'}


def test_switches_reach_every_mixer_of_any_family_and_clash_clearly():
    for name in ('vit3_tiny', 'hvit3_tiny'):
        model = timm.create_model(name, inner_loss='mse', inner_epochs=2, num_classes=3)
        mixers = [m for m in model.modules() if isinstance(m, TTTMixer)]
        assert mixers and all(m.inner[0].loss.name == 'mse' and m.inner[0].epochs == 2 for m in mixers)
        assert all(m.inner[1].epochs == 2 for m in mixers)            # the conv head trains as long
    with pytest.raises(ValueError, match='inner_loss given twice'):
        timm.create_model('vit3_tiny', inner_loss='mse', ttt_kwargs=dict(inner_loss='dot'))
    with pytest.raises(ValueError, match="takes no inner_ratio"):
        timm.create_model('vit3_tiny', inner_ratio=2)
    with pytest.raises(ValueError, match="inner_lr must be a number or 'dynamic'"):
        timm.create_model('vit3_design_small', **SMALL, inner_lr='fast')
    with pytest.raises(ValueError, match='token-wise inner model'):
        timm.create_model('vit3_design_small', **SMALL, inner_model='dwconv3x3', inner_batches=2)


def test_one_epoch_one_batch_is_todays_path_exactly():
    torch.manual_seed(0)
    default = TTTMixer(32, 4)
    explicit = TTTMixer(32, 4, inner_model='glu', inner_epochs=1, inner_batches=1, inner_lr=1.0)
    explicit.load_state_dict(default.state_dict())
    assert isinstance(explicit.inner[0], SwiGLUInner)
    x = torch.randn(2, 12, 32)
    torch.testing.assert_close(explicit(x, (3, 4)), default(x, (3, 4)), rtol=0, atol=0)
    # the fused default = the composable path, which is the generic composition
    with vittt.fast_path(default, fused=False):
        torch.testing.assert_close(default(x, (3, 4)), explicit(x, (3, 4)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('switches', [dict(inner_model='fc'), dict(inner_loss='mse'), dict(inner_model='swiglu')])
def test_memory_lean_mode_equals_the_default_path_for_design_models(switches):
    model = timm.create_model('vit3_design_small', **SMALL, **switches).eval()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        expected = model(x)
        with vittt.fast_path(model, memory_lean=True, chunk_tokens=5):
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('loss,reaches', [('dot', True), ('mse', True), ('mae', False)])
def test_insight_1_the_value_projection_learns_only_through_the_mixed_derivative(loss, reaches):
    """W_V reaches the outer loss only through d²L/dV̂dV: -(s/N) I for dot, (s/N) I for MSE, 0 for MAE."""
    torch.manual_seed(0)
    model = timm.create_model('vit3_design_small', **SMALL, inner_loss=loss)
    model(torch.randn(2, 3, 48, 48)).square().mean().backward()
    c = SMALL['embed_dim']
    grad = model.blocks[0].attn.qkv.weight.grad
    assert grad[:2 * c].abs().max() > 0                       # queries and keys always learn
    assert (grad[2 * c:].abs().max() > 0) == reaches
