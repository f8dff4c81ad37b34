"""vittt explain inner: per-layer, per-head inner-training statistics of one image."""
import json

import pytest
import timm
import torch

import vittt  # noqa: F401
from vittt.cli import main
from vittt.layers import record_inner_stats
from vittt.tasks.explain.inner import STATS, inner_introspection

TINY = dict(embed_dim=48, depth=2, num_heads=3, num_classes=4)


def test_every_inner_model_reports_each_head():
    model = timm.create_model('vit3_tiny', **TINY)
    result = inner_introspection(model, torch.randn(3, 48, 64))
    assert list(result['layers']) == [f'blocks.{i}.attn.inner.{j}' for i in range(2) for j in range(2)]
    for name, row in result['layers'].items():
        heads = 3 if name.endswith('.0') else 1         # the SwiGLU heads; the one conv head
        assert all(len(row[key]) == heads for key in STATS), name
        assert all(v >= 0 for v in row['grad_norm'] + row['update'])
        # the soft normalisation g / (|g| + 1) shrinks every gradient
        assert all(a <= b for a, b in zip(row['grad_norm_normalized'], row['grad_norm']))
    assert len(result['logits']) == 4


def test_a_small_mse_step_lowers_every_heads_loss_and_recording_ends():
    model = timm.create_model('vit3_design_small', **TINY, inner_loss='mse', inner_lr=0.05)
    result = inner_introspection(model, torch.randn(3, 32, 32))
    for row in result['layers'].values():
        assert all(after < before for before, after in zip(row['loss_before'], row['loss_after']))
    with record_inner_stats(model) as stats:
        pass
    assert all(m.stats is None for m in model.modules() if hasattr(m, 'stats'))   # switched back off
    assert stats == {name: [] for name in result['layers']}


def test_recording_does_not_change_the_output():
    model = timm.create_model('vit3_tiny', **TINY).eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        expected = model(x)
        with record_inner_stats(model):
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)   # composable = fused path


def test_models_without_inner_models_are_refused():
    with pytest.raises(ValueError, match='nothing to introspect'):
        inner_introspection(timm.create_model('resnet18', num_classes=2), torch.randn(3, 32, 32))


def test_cli_writes_png_and_json(tmp_path, capsys):
    out = tmp_path / 'inner'
    assert main(['explain', 'inner', '--models', 'vit3_design_small', '--data', 'noise', '--img-size', '32',
                 '--set', 'depth=2', 'embed_dim=48', 'num_heads=3', 'inner_loss=mae', '--output', str(out)]) == 0
    payload = json.loads((out / 'inner.json').read_text())
    assert (out / 'inner.png').stat().st_size > 0
    assert list(payload['layers']) == ['blocks.0.attn.inner.0', 'blocks.1.attn.inner.0']
    assert 'loss_before' in capsys.readouterr().out
