"""DenseBackbone: golden parity with the official dense H-ViT³, shapes and strides of every registered model at
square and odd sizes, the simple feature pyramid, gradient checkpointing, frozen stages and norm_eval."""
from pathlib import Path

import pytest
import torch

import vittt  # noqa: F401  (before timm / torchvision)
import timm
from vittt.dense import DenseBackbone, SimpleFeaturePyramid

GOLDEN = Path(__file__).resolve().parents[1] / 'fixtures' / 'golden'
MICRO = dict(dims=(32, 64, 96, 128), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4))
BACKBONES = [n for n in timm.list_models(('vit3_*', 'hvit3_*', 'vision_ttt_*')) if 'design' not in n]


def _golden():
    from safetensors.torch import load_file
    return load_file(GOLDEN / 'hvit3_dense_micro.io.safetensors')


def test_golden_parity_with_the_official_dense_backbone():
    io = _golden()
    backbone = DenseBackbone('hvit3_tiny', checkpoint=GOLDEN / 'hvit3_dense_micro.weights.safetensors',
                             **MICRO).eval()
    assert backbone.out_channels == [32, 64, 96, 128] and backbone.strides == [4, 8, 16, 32]
    with torch.no_grad():
        for size in ('square', 'odd'):
            outs = backbone(io[f'{size}_input'])
            assert len(outs) == 4
            for i, out in enumerate(outs):
                ref = io[f'{size}_out{i}']
                assert out.shape == ref.shape
                torch.testing.assert_close(out, ref, atol=1e-5, rtol=0, msg=lambda m: f'{size} level {i}: {m}')


@pytest.mark.parametrize('name', BACKBONES)
def test_every_registered_model_gives_strides_4_to_32_at_any_size(name):
    backbone = DenseBackbone(name).eval()
    assert backbone.strides == [4, 8, 16, 32]
    assert [f['reduction'] for f in backbone.feature_info] == [4, 8, 16, 32]
    with torch.no_grad():
        for h, w in ((64, 64), (150, 97), (33, 45)):
            outs = backbone(torch.randn(1, 3, h, w))
            assert [o.shape[1] for o in outs] == backbone.out_channels
            if name.startswith('hvit3'):  # stem pads to 4, each merge pads odd grids: ceil
                grids = [(-(-h // s), -(-w // s)) for s in (4, 8, 16, 32)]
            else:  # one stride-16 grid, x4 / x2 deconvolved and ceil-pooled
                g = (-(-h // 16), -(-w // 16))
                grids = [(4 * g[0], 4 * g[1]), (2 * g[0], 2 * g[1]), g, (-(-g[0] // 2), -(-g[1] // 2))]
            assert [tuple(o.shape[-2:]) for o in outs] == grids, (h, w)


def test_simple_feature_pyramid_odd_grid_and_channels():
    sfp = SimpleFeaturePyramid(64, 'last', out_chs=32)
    outs = sfp([torch.randn(2, 64, 13, 9)])  # 200x136 at stride 16
    assert [tuple(o.shape[1:]) for o in outs] == [(32, 52, 36), (32, 26, 18), (32, 13, 9), (32, 7, 5)]
    taps = SimpleFeaturePyramid(64, 'taps')
    assert taps.out_channels == [64] * 4
    with pytest.raises(ValueError, match='takes 4 stride-16 map'):
        taps([torch.randn(1, 64, 4, 4)])
    last = SimpleFeaturePyramid(64, 'last')
    assert last.out_channels == [16, 32, 64, 64]  # ViTDet: C/4, C/2, C, C


def test_plain_models_last_and_taps_and_third_party_models():
    vit = DenseBackbone('vit3_tiny', embed_dim=64, depth=4, num_heads=2)
    assert vit.pyramid.mode == 'last' and vit.norms is None
    taps = DenseBackbone('vit3_tiny', pyramid='taps', embed_dim=64, depth=4, num_heads=2)
    assert taps.pyramid.mode == 'taps' and taps.out_channels == [64] * 4
    conv = DenseBackbone('convnext_atto')
    assert conv.norms is None and conv.out_channels == [40, 80, 160, 320]
    res = DenseBackbone('resnet18')  # strides 2..32: the stride-2 level is left out
    assert res.strides == [4, 8, 16, 32] and res.out_channels == [64, 128, 256, 512]
    assert DenseBackbone('hvit3_tiny', strides=(8, 16, 32), **MICRO).out_channels == [64, 96, 128]
    with pytest.raises(ValueError, match='already has strides'):
        DenseBackbone('convnext_atto', pyramid='last')


def test_grad_checkpointing_equals_plain_backward():
    torch.manual_seed(0)
    a = DenseBackbone('hvit3_tiny', **MICRO)
    b = DenseBackbone('hvit3_tiny', grad_checkpointing=True, **MICRO)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 70, 54)
    outs = []
    for model in (a, b):
        model.train()
        torch.manual_seed(1)
        loss = sum((o ** 2).mean() for o in model(x))
        loss.backward()
        outs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], atol=1e-6, rtol=1e-5, msg=lambda m: f'{name}: {m}')


def test_frozen_stages_and_norm_eval():
    b = DenseBackbone('hvit3_tiny', frozen_stages=1, **MICRO)
    frozen = {n for n, p in b.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(('trunk.model.patch_embed.', 'trunk.model.layers.0.')) for n in frozen)
    assert any('layers.0.downsample' in n for n in frozen) and any('patch_embed' in n for n in frozen)
    assert not any('layers.1.' in n for n in frozen)
    b.train()
    assert not b.body.patch_embed.training and not b.body.layers[0].training and b.body.layers[1].training
    stem_only = DenseBackbone('hvit3_tiny', frozen_stages=0, **MICRO)
    assert {n.split('.')[2] for n, p in stem_only.named_parameters() if not p.requires_grad} == {'patch_embed'}
    ne = DenseBackbone('hvit3_tiny', norm_eval=True, **MICRO).train()
    bns = [m for m in ne.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert all(p.requires_grad for p in ne.parameters())


def test_classification_checkpoint_loads_with_fresh_level_norms(tmp_path):
    from safetensors.torch import save_file
    cls = timm.create_model('hvit3_tiny', num_classes=10, **MICRO)
    path = tmp_path / 'cls.safetensors'
    save_file(cls.state_dict(), str(path))
    b = DenseBackbone('hvit3_tiny', **MICRO)
    report = b.load_official(path)
    assert set(report['initialised']) == {f'norms.{i}.{p}' for i in range(4) for p in ('weight', 'bias')}
    assert any(k.startswith('head.') for k in report['dropped'])
    torch.testing.assert_close(b.body.layers[1].blocks[0].attn.qkv.weight, cls.layers[1].blocks[0].attn.qkv.weight)
    bad = dict(cls.state_dict())
    bad['layers.0.blocks.0.attn.qkv.weight'] = torch.zeros(3, 3)
    save_file(bad, str(path))
    with pytest.raises(ValueError, match=r'layers\.0\.blocks\.0\.attn\.qkv\.weight'):
        DenseBackbone('hvit3_tiny', **MICRO).load_official(path)
