"""DiT³ and its DiT baseline: golden parity with the official code, the embedder and table formulas, zero output at
init, any latent size, batch independence (exact batched CFG), converter errors, params and MACs of Table 10."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vittt.cli import main
from vittt.layers.adaln import sincos_2d, timestep_features
from vittt.models import CheckpointError
from vittt.models.dit3 import DiT3, create_dit, dit_model_args, resolve_dit_name, unpatchify
from vittt.models.official import convert_dit_state_dict, dit_config_from_state_dict

GOLDEN = Path(__file__).resolve().parents[1] / 'fixtures' / 'golden'
MICRO = dict(in_chans=4, patch_size=2, embed_dim=64, depth=2, num_heads=2, num_classes=10, class_dropout_prob=0.1,
             learn_sigma=True)
FAMILIES = {'dit3': dict(mixer='ttt', cpe=True), 'dit': dict(mixer='attention', cpe=False)}


def _micro(family, **kwargs):
    torch.manual_seed(0)
    return DiT3(**dict(MICRO, **FAMILIES[family], **kwargs)).eval()


def _tiny(family='dit3', **kwargs):
    return _micro(family, **dict(dict(embed_dim=32, depth=1, num_heads=2), **kwargs))


@pytest.mark.parametrize('family', list(FAMILIES))
def test_golden_parity_with_the_official_models(family):
    weights = load_file(GOLDEN / f'{family}_micro.weights.safetensors')
    io = load_file(GOLDEN / f'{family}_micro.io.safetensors')
    model = _micro(family)
    model.load_state_dict(convert_dit_state_dict(weights, model))
    with torch.no_grad():
        out = model(io['x'], io['t'], io['y'])
        cfg = model.forward_with_cfg(io['cfg_x'], io['cfg_t'], io['cfg_y'], 4.0, guided_channels=3)
    assert out.shape == io['output'].shape == (3, 8, 16, 16)
    assert (out - io['output']).abs().max() <= 1e-5
    assert (cfg - io['cfg_output']).abs().max() <= 1e-5


@pytest.mark.parametrize('family', list(FAMILIES))
def test_checkpoint_files_load_through_create_dit_and_convert(family, tmp_path):
    weights = load_file(GOLDEN / f'{family}_micro.weights.safetensors')
    io = load_file(GOLDEN / f'{family}_micro.io.safetensors')
    config = dit_config_from_state_dict(weights)
    assert config['embed_dim'] == 64 and config['depth'] == 2 and config['num_classes'] == 10
    assert config['mixer'] == FAMILIES[family]['mixer'] and config['cpe'] == FAMILIES[family]['cpe']
    # the official train.py layout: {model, ema, opt, args} with an argparse.Namespace (EMA preferred)
    import argparse
    wrapped = tmp_path / 'ckpt.pt'
    torch.save({'model': {k: torch.zeros_like(v) for k, v in weights.items()}, 'ema': weights, 'opt': {},
                'args': argparse.Namespace(model='DiT-B/2')}, wrapped)
    name = 'dit3_b_2' if family == 'dit3' else 'dit_b_2'
    micro_overrides = dict(MICRO, **FAMILIES[family])
    model = create_dit(name, checkpoint=wrapped, **micro_overrides).eval()
    with torch.no_grad():
        assert (model(io['x'], io['t'], io['y']) - io['output']).abs().max() <= 1e-5
    out = tmp_path / 'converted.safetensors'
    assert main(['convert', str(wrapped), str(out)]) == 0
    converted = load_file(out)
    assert 'pos_embed' not in converted and set(converted) == set(model.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in model.state_dict().items())


def test_converter_errors():
    weights = load_file(GOLDEN / 'dit3_micro.weights.safetensors')
    model = _micro('dit3')
    bad_table = dict(weights, pos_embed=weights['pos_embed'] + 0.01)
    with pytest.raises(CheckpointError, match='pos_embed: differs from the 2-D sin-cos table of a 8×8 grid'):
        convert_dit_state_dict(bad_table, model)
    missing = {k: v for k, v in weights.items() if not k.startswith('blocks.1.cpe')}
    with pytest.raises(CheckpointError, match=r'missing keys \(2\):\n    blocks.1.cpe.bias\n    blocks.1.cpe.weight'):
        convert_dit_state_dict(missing, model)
    with pytest.raises(CheckpointError, match='unexpected keys'):
        convert_dit_state_dict(weights, _micro('dit'))  # DiT³ weights into the attention baseline
    with pytest.raises(CheckpointError, match='not a DiT³ / DiT checkpoint'):
        dit_config_from_state_dict({'patch_embed.proj.weight': torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown DiT model 'dit3_b_3' \(did you mean .*dit3_b_2"):
        resolve_dit_name('dit3_b_3')
    assert resolve_dit_name('DiTTT-B/2') == 'dit3_b_2' and resolve_dit_name('DiT-XL/2') == 'dit_xl_2'


def test_timestep_features_are_dits_formula():
    """cos first, frequencies exp(-ln(1e4) k / 128) for 256 features (diffusers divides by 127)."""
    t = torch.tensor([0.0, 1.0, 417.0, 999.0], dtype=torch.float64)
    k = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * k / 128)
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(timestep_features(t, 256).double(), expected, atol=2e-4, rtol=0)
    assert timestep_features(t, 255).shape == (4, 255) and timestep_features(t, 257)[:, -1].abs().max() == 0
    assert torch.equal(timestep_features(t, 256)[0, :128], torch.ones(128))  # cos(0) first


def test_sincos_table_layout_and_the_official_table():
    official = load_file(GOLDEN / 'dit3_micro.weights.safetensors')['pos_embed'][0]  # 8×8 grid, D = 64
    assert (sincos_2d((8, 8), 64) - official).abs().max() <= 1e-6
    h, w, dim = 3, 5, 16
    table = sincos_2d((h, w), dim).reshape(h, w, dim).double()
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    for i in range(h):
        for j in range(w):
            col = torch.cat([torch.sin(j * omega), torch.cos(j * omega)])  # first half: the column index
            row = torch.cat([torch.sin(i * omega), torch.cos(i * omega)])
            torch.testing.assert_close(table[i, j], torch.cat([col, row]), atol=1e-6, rtol=0)
    assert sincos_2d((h, w), dim) is sincos_2d((h, w), dim)  # cached per grid
    with pytest.raises(ValueError, match='divisible by 4'):
        sincos_2d((2, 2), 18)


def test_mac_counting_first_leaves_real_position_tables():
    """Counting MACs (FakeTensorMode) at a grid never seen before must not cache a fake table that later real
    forwards at that grid would use (they would return fake tensors without computing anything)."""
    from torch._subclasses.fake_tensor import FakeTensor

    from vittt.bench import count_macs
    from vittt.layers.adaln import _sincos_2d

    model = create_dit('dit3_s_2', depth=1, embed_dim=32, num_heads=2).eval()
    _sincos_2d.cache_clear()
    count_macs(model, (4, 22, 26), model_args=dit_model_args)  # grid 11×13, first seen under fake tensors
    with torch.device('meta'):
        sincos_2d((5, 7), 32)  # a meta default device neither
    table = sincos_2d((11, 13), 32)
    assert type(table) is torch.Tensor and not isinstance(table, FakeTensor) and table.device.type == 'cpu'
    assert sincos_2d((5, 7), 32).device.type == 'cpu'
    x, t, y = dit_model_args(torch.randn(1, 4, 22, 26))
    out = model(x, t, y)
    assert type(out) is torch.Tensor and torch.isfinite(out).all()


@pytest.mark.parametrize('family', list(FAMILIES))
def test_output_is_zero_at_init(family):
    model = _micro(family, in_chans=1).train()
    x = torch.randn(2, 1, 8, 12)
    out = model(x, torch.tensor([5, 900]), torch.tensor([1, 10]))
    assert out.shape == (2, 2, 8, 12) and torch.equal(out, torch.zeros_like(out))


def test_unpatchify_order():
    """A token's vector is read as (p_row, p_col, c)."""
    p, c, h, w = 2, 3, 2, 3
    tokens = torch.arange(h * w * p * p * c, dtype=torch.float32).reshape(1, h * w, p * p * c)
    out = unpatchify(tokens, (h, w), p, c)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for q in range(p):
                    for ch in range(c):
                        assert out[0, ch, i * p + a, j * p + q] == tokens[0, i * w + j, (a * p + q) * c + ch]


def _trained_like(model):
    """Non-zero adaLN and final layers, so the output depends on everything."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize('family', list(FAMILIES))
def test_any_latent_size_and_batch_independence(family):
    model = _trained_like(_tiny(family))
    x = torch.randn(3, 4, 16, 16)
    t, y = torch.tensor([0, 417, 999]), torch.tensor([3, 7, 10])
    with torch.no_grad():
        batched = model(x, t, y)
        single = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(3)])
        wide = model(torch.randn(2, 4, 6, 20), t[:2], y[:2])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)
    assert wide.shape == (2, 8, 6, 20) and torch.isfinite(wide).all()


def test_batched_cfg_equals_separate_conditional_and_null_forwards():
    model = _trained_like(_tiny())
    x = torch.randn(2, 4, 8, 8)
    t, y = torch.tensor([10, 500]), torch.tensor([1, 2])
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.0)
        cond, uncond = model(x, t, y), model(x, t, null)
    expected_eps = uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])
    torch.testing.assert_close(guided[:2, :4], expected_eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[2:, :4], expected_eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[:2, 4:], cond[:, 4:], atol=1e-6, rtol=1e-6)  # σ from the conditional half
    with pytest.raises(ValueError, match=r'guided_channels must be in \[1, 4\]'):
        model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.0, guided_channels=5)


def test_clear_errors_and_label_dropout():
    model = _tiny()
    t, y = torch.tensor([1, 2]), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r'multiples of the patch size 2, got 9×8'):
        model(torch.randn(2, 4, 9, 8), t, y)
    with pytest.raises(ValueError, match=r'expected inputs \[B, 4, H, W\]'):
        model(torch.randn(2, 3, 8, 8), t, y)
    with pytest.raises(ValueError, match=r'labels must be in \[0, 10\] \(10 is the null class\)'):
        model(torch.randn(2, 4, 8, 8), t, torch.tensor([0, 11]))
    no_null = _tiny(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match='no null class'):
        no_null(torch.randn(2, 4, 8, 8), t, torch.tensor([0, 10]))
    model = _trained_like(model).train()
    x = torch.randn(2, 4, 8, 8)
    dropped = model(x, t, y, drop_mask=torch.tensor([True, False]))
    explicit = model(x, t, torch.tensor([10, 1]))
    torch.testing.assert_close(dropped, explicit)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_every_parameter_gets_a_gradient(family):
    model = _trained_like(_tiny(family)).train()
    out = model(torch.randn(2, 4, 8, 12), torch.tensor([3, 800]), torch.tensor([1, 10]))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []


@pytest.mark.parametrize('name, params_m, gmacs', [
    ('dit3_s_2', 34.69, 6.219), ('dit3_b_2', 133.96, 23.330), ('dit3_b_4', 134.07, 5.873),
    ('dit3_b_8', 134.51, 1.509), ('dit_s_2', 32.87, 6.06), ('dit_b_2', 130.32, 23.01)])
def test_params_and_macs_at_latent_32_match_the_official_models(name, params_m, gmacs):
    """Spec §1.9: counted on the official models (pos_embed excluded); the paper's Table 10 FLOPs are these MACs."""
    from vittt.bench import count_macs, count_params

    model = create_dit(name)
    assert count_params(model) / 1e6 == pytest.approx(params_m, abs=0.006)
    assert count_macs(model, (4, 32, 32), model_args=dit_model_args) / 1e9 == pytest.approx(gmacs, rel=2e-3)


@pytest.mark.parametrize('name, params_m, gmacs', [
    ('dit3_l_2', 467.5, 81.56), ('dit3_l_4', 467.7, 20.52), ('dit3_l_8', 468.3, 5.25),
    ('dit3_xl_2', 689.1, 120.42), ('dit3_xl_4', 689.3, 30.29), ('dit3_xl_8', 689.9, 7.75),
    ('dit_xl_2', 674.8, 118.6)])
def test_large_configs_params_and_macs(name, params_m, gmacs):
    """Spec §1.9 (L / XL counted on the official models on the meta device; DiT-XL/2: the DiT paper's 118.6 G)."""
    from vittt.bench import count_macs, count_params
    with torch.device('meta'):
        model = create_dit(name)
    assert count_params(model) / 1e6 == pytest.approx(params_m, abs=0.06 if name.startswith('dit3') else 0.6)
    assert count_macs(model, (4, 32, 32), model_args=dit_model_args) / 1e9 == pytest.approx(gmacs, rel=3e-3)


def test_converted_golden_round_trip(tmp_path):
    weights = load_file(GOLDEN / 'dit3_micro.weights.safetensors')
    path = tmp_path / 'official.safetensors'
    save_file(weights, path)
    model = create_dit('dit3_s_2', checkpoint=path, **MICRO)
    assert set(model.state_dict()) == set(convert_dit_state_dict(weights))
