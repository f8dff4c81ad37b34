"""The experimental mm plugin as a plain module (mmdet / mmseg cannot build models here: no compiled mmcv ops)."""
from pathlib import Path

import torch

import vittt  # noqa: F401

GOLDEN = Path(__file__).resolve().parents[1] / 'fixtures' / 'golden'
MICRO = dict(dims=(32, 64, 96, 128), depths=(1, 2, 1, 1), num_heads=(1, 2, 3, 4))


def test_vittt_backbone_takes_the_official_dense_state_dict_unchanged():
    from safetensors.torch import load_file
    from vittt.contrib.mm import VitttBackbone
    official = load_file(GOLDEN / 'hvit3_dense_micro.weights.safetensors')
    io = load_file(GOLDEN / 'hvit3_dense_micro.io.safetensors')
    backbone = VitttBackbone('hvit3_tiny', **MICRO)
    backbone.load_state_dict(official)  # official key names (as mmengine hands them over), strictly
    outs = backbone.eval()(io['odd_input'])
    assert isinstance(outs, tuple) and len(outs) == 4
    for i, out in enumerate(outs):
        torch.testing.assert_close(out, io[f'odd_out{i}'], atol=1e-5, rtol=0)
    again = VitttBackbone('hvit3_tiny', init_cfg=dict(checkpoint=GOLDEN / 'hvit3_dense_micro.weights.safetensors'),
                          **MICRO)
    again.init_weights()
    torch.testing.assert_close(again.eval()(io['odd_input'])[3], io['odd_out3'], atol=1e-5, rtol=0)
    again.load_state_dict(backbone.state_dict())  # our own layout passes through untouched
